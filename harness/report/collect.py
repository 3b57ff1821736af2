"""What a report is made of, read from MLflow (never from files lying around): per model its final run, logged
predictions and embeddings, training curves, tuning trials and device timing."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlflow.entities import Run

from harness.errors import HarnessError
from harness.evaluation.metrics import read_predictions
from harness.tracking import runs as tracking
from harness.tracking import schema


@dataclass
class ModelResult:
    key: str
    task: str
    backbone: str
    run: Run
    predictions: list[dict]
    embeddings: dict[str, np.ndarray]
    data: dict
    history: dict[str, list[float]]
    trials: list[dict] = field(default_factory=list)  # from the parent search: number, objective, hyperparameters
    search: Run | None = None
    baseline: Run | None = None  # logistic regression on pooled features of the same search
    baseline_predictions: list[dict] = field(default_factory=list)
    nested: Run | None = None  # the nested cross-validation estimate of the search procedure, when run
    audit: dict | None = None  # the source audit of the model's task and backbone (audit.json)
    gradcam: dict | None = None  # Grad-CAM on the test images: outside-lung shares per class (gradcam.json)
    gradcam_png: bytes | None = None  # the grid of the most confident right and wrong test images

    @property
    def head_trials(self) -> list[dict]:
        return [t for t in self.trials if t.get("stage", "head") == "head"]

    @property
    def tags(self) -> dict:
        return self.run.data.tags

    @property
    def metrics(self) -> dict:
        return self.run.data.metrics

    @property
    def params(self) -> dict:
        return self.run.data.params

    @property
    def classes(self) -> list[str]:
        return list(self.data["classes"])

    def split(self, name: str) -> list[dict]:
        return [p for p in self.predictions if p["split"] == name]


@dataclass
class Study:
    name: str
    experiment_id: str
    models: list[ModelResult]
    missing: list[str]  # expected models without a final run, with the reason when the search skipped them
    device_runs: list[Run]  # every final/train run of the study, for the CPU-vs-GPU table
    champions: dict = field(
        default_factory=dict
    )  # per task: the alias `champion` and why (moved by the study's champion stage)
    skipped: dict = field(default_factory=dict)  # model key -> why the search skipped it (an experiment tag)


def _artifact_json(client, run_id: str, path: str, tmp: Path):
    return json.loads(Path(client.download_artifacts(run_id, path, str(tmp))).read_text())


def _trials(client, parent: Run) -> list[dict]:
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"{schema.parent_filter(parent.info.run_id)} and {schema.kind_filter(schema.TRIAL)}",
    )
    objective = parent.data.params.get(schema.SEARCH_OBJECTIVE, "val_loss")
    rows = []
    for r in runs:
        rows.append(
            {
                "trial": r.data.tags.get(schema.TRIAL_ID, "?"),
                "status": r.info.status,
                "objective": r.data.metrics.get(f"{schema.TRIAL_BEST}{objective}", float("nan")),
                "seconds": r.data.metrics.get("trial_seconds", float("nan")),
                "stage": r.data.tags.get(schema.STAGE, "head"),
                "pruned": r.data.tags.get(schema.PRUNED) == "true",
                **{k.removeprefix(schema.HP): v for k, v in r.data.params.items() if k.startswith(schema.HP)},
            }
        )
    return sorted(rows, key=lambda r: _trial_order(r["trial"]))


def _trial_order(trial: str) -> tuple:
    """Trial ids in number order ("2" before "10"), as Keras Tuner counts them (from 0)."""
    return (0, int(trial), "") if str(trial).isdigit() else (1, 0, str(trial))


def collect(study: str, expected: list[str] | None = None) -> Study:
    import mlflow

    mlflow.set_tracking_uri(tracking.get_paths().tracking_uri)
    client = tracking.client()
    exp = client.get_experiment_by_name(study)
    if exp is None:
        raise HarnessError(
            f"no MLflow experiment '{study}' in {tracking.get_paths().tracking_uri}; run "
            f"`harness tune` on its recipe first"
        )
    runs = client.search_runs(
        [exp.experiment_id],
        filter_string="attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=5000,
    )
    finals = [r for r in runs if r.data.tags.get(schema.KIND) in (schema.FINAL, schema.TRAIN)]
    chosen: dict[str, Run] = {}
    for r in finals:  # newest first; a tuned final model beats a plain train run of the same model
        key = r.data.tags.get(schema.MODEL_KEY, "?")
        if key not in chosen or (
            chosen[key].data.tags[schema.KIND] == schema.TRAIN and r.data.tags[schema.KIND] == schema.FINAL
        ):
            chosen[key] = r
    models = []
    with tempfile.TemporaryDirectory() as tmp:
        for key, r in sorted(chosen.items()):
            rid = r.info.run_id
            sub = Path(tmp) / rid
            sub.mkdir()
            emb = np.load(client.download_artifacts(rid, "embeddings.npz", str(sub)), allow_pickle=False)
            history = {
                m: [h.value for h in sorted(client.get_metric_history(rid, m), key=lambda h: h.step)]
                for m in ("loss", "val_loss", "accuracy", "val_accuracy")
            }
            parent_id = r.data.tags.get(schema.PARENT)
            parent = client.get_run(parent_id) if parent_id else None
            children = [b for b in runs if parent_id and b.data.tags.get(schema.PARENT) == parent_id]
            base = [b for b in children if b.data.tags.get(schema.KIND) == schema.BASELINE]
            nested = [b for b in children if b.data.tags.get(schema.KIND) == schema.NESTED]
            audits = [b for b in children if b.data.tags.get(schema.KIND) == schema.AUDIT]
            artifacts = {a.path for a in client.list_artifacts(rid)}
            models.append(
                ModelResult(
                    key=key,
                    task=r.data.tags.get(schema.TASK, "?"),
                    backbone=r.data.tags.get(schema.BACKBONE, "?"),
                    run=r,
                    predictions=read_predictions(client, rid, str(sub)),
                    embeddings={k: emb[k] for k in emb.files},
                    data=_artifact_json(client, rid, "data.json", sub),
                    history=history,
                    trials=_trials(client, parent) if parent else [],
                    search=parent,
                    baseline=base[0] if base else None,
                    baseline_predictions=read_predictions(client, base[0].info.run_id, str(sub / "floor"))
                    if base
                    else [],
                    nested=nested[0] if nested else None,
                    audit=_artifact_json(client, audits[0].info.run_id, "audit.json", sub) if audits else None,
                    gradcam=_artifact_json(client, rid, "gradcam.json", sub) if "gradcam.json" in artifacts else None,
                    gradcam_png=Path(client.download_artifacts(rid, "gradcam.png", str(sub))).read_bytes()
                    if "gradcam.png" in artifacts
                    else None,
                )
            )
    skipped = {
        k.removeprefix(schema.SKIPPED_PREFIX): v for k, v in exp.tags.items() if k.startswith(schema.SKIPPED_PREFIX)
    }
    expected = [*(expected or []), *(k for k in skipped if k not in (expected or []))]  # a skipped ensemble too
    missing = [f"{k} (skipped: {skipped[k]})" if k in skipped else k for k in expected if k not in chosen]
    return Study(
        study, exp.experiment_id, models, missing, finals, skipped={k: v for k, v in skipped.items() if k not in chosen}
    )
