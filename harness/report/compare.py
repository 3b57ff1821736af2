"""`compare(study)`: the report of a study's MLflow runs, report.md + report.html (+ PNGs), logged as a `compare` run.
Read-only towards the study: it never writes to the registry (the champion alias is read, not moved).

The page, top to bottom: the title and one line of what the study is; per task the answer (one sentence, a forest
plot of every model's test accuracy, a compact table in selection order with the champion marked, a line per
skipped model); `extra_sections` (the hook for more sections); the comparisons across models, each folded; each
model's details, folded under its task; the source audit, device and timing, the data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

import mlflow
import numpy as np

from harness.paths import get_paths
from harness.report import answer, per_model, provenance, sections
from harness.report.collect import Study, collect
from harness.report.common import test_metrics
from harness.report.cost import cost_sections
from harness.report.evaluation import evaluation_sections
from harness.report.render import details, h, p, to_html, to_markdown
from harness.tracking import runs as tracking
from harness.tracking import schema

log = logging.getLogger(__name__)


def extra_sections(study: Study, out: Path) -> list:
    """Per task, folded after the answers: calibration, operating point, decision curve, failure analysis and model
    cards (`harness.report.evaluation`), then serving cost (`harness.report.cost`); a task with none of it logged (an
    older store) gets no block."""
    blocks = []
    for task in sorted({m.task for m in study.models}):
        inner = evaluation_sections(study, task, out, level=3) + cost_sections(study, task, out, level=3)
        if inner:
            blocks.append(details(f"Calibration, operating point, failures and serving cost — {task}", inner, level=2))
    return blocks


def header(study: Study) -> list:
    tasks = sorted({m.task for m in study.models})
    classes = {t: next(m.classes for m in study.models if m.task == t) for t in tasks}
    what = "; ".join(f"task {t}: {', '.join(classes[t])}" for t in tasks)
    return [
        h(f"Comparison report: study '{study.name}'", 1),
        p(
            f"{len(study.models)} model(s) on {len(tasks)} task(s) ({what}), from MLflow experiment "
            f"{study.experiment_id} ({get_paths().tracking_uri}); generated {time.strftime('%Y-%m-%d %H:%M')}. "
            f"Research use only, not a diagnostic tool: an image's source can stand in for its label (DeGrave et "
            f"al. 2021; see the source audit and the t-SNE by source).",
            "note",
        ),
    ]


def build_blocks(study: Study, out: Path) -> tuple[list, dict]:
    """The report's blocks and each model's test metrics (recomputed from its logged predictions)."""
    models = study.models
    computed = {m.key: test_metrics(m) for m in models}
    if not models:
        lines = [p(f"Not in this report: {m}.", "note") for m in study.missing]
        return header(study) + [p("No model of this study has a final run yet.")] + lines, computed
    blocks = header(study) + answer.summary(study, computed, out) + extra_sections(study, out)
    blocks += sections.champions(study)
    blocks += sections.floor(models, computed)
    blocks += sections.mcnemar_pairs(models)
    blocks += sections.colour(models, computed)
    blocks += sections.nested(models, computed)
    blocks += sections.gradcam(models)
    blocks += provenance.audit(models, computed)
    blocks += per_model.models(study, computed, out)
    blocks += provenance.timing(models, study) + provenance.data(models)
    return blocks, computed


def compare(study: str, out: Path | None = None, expected: list[str] | None = None) -> Path:
    """Build the report of a study from MLflow into `out` (default under HARNESS_HOME), log it, return report.html."""
    from harness.tracking.registry import champions

    log.info("Report of study %s", study)
    data = collect(study, expected)  # before setup(), which would create a missing experiment
    tracking.setup(study)
    out = (out or get_paths().reports / study).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if n := tracking.end_orphans(mlflow.get_experiment_by_name(study).experiment_id, schema.COMPARE):
        log.warning("Study %s: %d earlier compare run(s) whose process was killed marked KILLED", study, n)
    with tracking.run(f"compare {study}", tags={schema.KIND: schema.COMPARE, schema.STUDY: study}):
        data.champions = champions(study, [m.run for m in data.models])
        mlflow.set_tags(
            {
                f"champion.{task}": f"{c['uri']} = version {c['version']} ({c['model_key']})"
                for task, c in data.champions.items()
            }
        )
        blocks, computed = build_blocks(data, out)
        (out / "report.md").write_text(to_markdown(blocks, out))
        (out / "report.html").write_text(to_html(blocks, f"cxr-harness report: {study}"))
        for key, t in computed.items():
            mlflow.log_metrics(
                {
                    f"{key}.test.{k}": v
                    for k, v in t.items()
                    if k in ("accuracy", "accuracy_cp_low", "accuracy_cp_high") and np.isfinite(v)
                }
            )
        mlflow.log_artifacts(str(out), "report")
    return out / "report.html"
