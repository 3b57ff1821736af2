"""Model-card stage, after a study's models and ensembles: every newest final run gets a `model_card.md` artifact
(intended use, data and its digests, splits and patient grouping, metrics with CIs, calibration, operating point,
floor, nested estimate, source audit, limitations), and each registered model version of that run carries the card as
its description, so the MLflow UI shows it on the version's page. It reads the run tree; it trains nothing."""

from __future__ import annotations

import logging

from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.tracking.registry import latest_finals

log = logging.getLogger(__name__)


def write_cards(study: str) -> int:
    """A card for each newest final run of the study (rewritten: a later stage may have added a figure). Returns
    how many."""
    c = tracking.client()
    finals = latest_finals(study)
    for run in finals:
        card = model_card(c, run)
        c.log_text(run.info.run_id, card, schema.MODEL_CARD)
        for v in c.search_model_versions(f"run_id = '{run.info.run_id}'"):
            c.update_model_version(v.name, v.version, description=card)
    log.info("model cards written for %d final models of %s", len(finals), study)
    return len(finals)


def _children(c, run) -> dict:
    """kind -> the FINISHED floor / audit / nested run beside this final run (under the same search run)."""
    parent = run.data.tags.get(schema.PARENT)
    if not parent:
        return {}
    runs = c.search_runs(
        [run.info.experiment_id],
        filter_string=f"{schema.parent_filter(parent)} and attributes.status = 'FINISHED'",
    )
    return {r.data.tags.get(schema.KIND): r for r in runs}


def _ci(m: dict, prefix: str, name: str = "accuracy") -> str:
    v = m.get(f"{prefix}{name}")
    if v is None:
        return "not measured"
    lo, hi = (
        m.get(f"{prefix}{name}_cp_low", m.get(f"{prefix}{name}_ci_low")),
        m.get(f"{prefix}{name}_cp_high", m.get(f"{prefix}{name}_ci_high")),
    )
    return f"{v:.3f}" + (f" [95% CI {lo:.3f}, {hi:.3f}]" if lo is not None and hi is not None else "")


def model_card(c, run) -> str:
    """The card's markdown for one final run."""
    tags, m = run.data.tags, run.data.metrics
    kids = _children(c, run)
    lines = [
        f"# Model card: {tags.get(schema.MODEL_KEY, '?')}",
        "",
        "**Intended use: research and teaching only.** Not a medical device; not for diagnosis or triage. Trained on "
        "a small public chest X-ray collection whose sources differ by class (see the source audit below).",
        "",
        "## Model",
        f"- Task `{tags.get(schema.TASK)}`, backbone `{tags.get(schema.BACKBONE)}`, final stage "
        f"`{tags.get(schema.FINAL_STAGE, 'head')}` ({tags.get(schema.FINAL_MODE, '?')}); run `{run.info.run_id}`, "
        f"registered as `{tags.get(schema.REGISTERED_MODEL, 'not registered')}`.",
        f"- Input: raw 0–255 RGB images of the recipe's size; preprocessing is inside the model. Device: "
        f"{tags.get(schema.DEVICE_NAME, tags.get(schema.DEVICE, '?'))}.",
        "",
        "## Data",
        f"- Test split: {tags.get('test_source', '?')}. Splits and cross-validation folds keep each patient group "
        "together (the recipe's `data.group_pattern`), so no patient is on both sides.",
    ]
    for d in run.inputs.dataset_inputs if run.inputs else []:
        context = next((t.value for t in d.tags if t.key == "mlflow.data.context"), "?")
        lines.append(f"- {context}: dataset `{d.dataset.name}`, digest `{d.dataset.digest}`")
    lines += ["", "## Performance (test split, read once)", f"- Accuracy {_ci(m, schema.TEST)}"]
    for k in ("macro_f1", "roc_auc"):
        if f"{schema.TEST}{k}" in m:
            lines.append(f"- {k.replace('_', ' ')} {m[f'{schema.TEST}{k}']:.3f}")
    lines += _calibration_lines(m) + _operating_lines(tags, m) + _context_lines(kids)
    lines += [
        "",
        "## Limitations",
        "- Small data (a few hundred images): wide confidence intervals; the estimates do not transfer to another "
        "hospital, scanner or population without re-validation.",
        "- Labels come from the public sources, not from a reference standard; image source and class are confounded.",
        "",
    ]
    return "\n".join(lines)


def _calibration_lines(m: dict) -> list[str]:
    if schema.TEMPERATURE not in m:
        return []
    cal = f"{schema.TEST.rstrip('.')}{schema.CALIBRATED}."
    out = ["", "## Calibration", f"- Temperature {m[schema.TEMPERATURE]:.3f}, fitted on out-of-fold predictions."]
    for label, prefix in (("before", schema.TEST), ("after", cal)):
        if f"{prefix}ece" in m:
            out.append(
                f"- Test ECE {label}: {_ci(m, prefix, 'ece')}; Brier {m.get(f'{prefix}brier', float('nan')):.3f}"
            )
    return out


def _operating_lines(tags: dict, m: dict) -> list[str]:
    if schema.OP_CLASS not in tags:
        return []
    cls, test = tags[schema.OP_CLASS], f"{schema.OP}test."
    out = [
        "",
        "## Operating point",
        f"- Decision: P({cls}) >= {m.get(f'{schema.OP}threshold', float('nan')):.4f}, chosen on out-of-fold "
        f"predictions for sensitivity {m.get(f'{schema.OP}target_sensitivity', float('nan')):.2f}; the served "
        "model's `decision` column applies it.",
    ]
    for k in ("sensitivity", "specificity", "ppv", "npv"):
        if f"{test}{k}" in m:
            out.append(f"- Test {k}: {_ci(m, test, k)}")
    return out


def _context_lines(kids: dict) -> list[str]:
    out, nan = [], float("nan")
    if schema.BASELINE in kids:
        floor = _ci(kids[schema.BASELINE].data.metrics, schema.TEST)
        out += ["", "## Floor", f"- Linear probe on the same features: test accuracy {floor}"]
    if schema.NESTED in kids:
        nm, pre = kids[schema.NESTED].data.metrics, schema.NESTED_PREFIX
        out += [
            "",
            "## Nested estimate (the whole procedure, out of fold on train+validation)",
            f"- Accuracy {_ci(nm, pre)}; floor {nm.get(f'{pre}floor.accuracy', nan):.3f}, "
            f"exact McNemar p {nm.get(f'{pre}vs_floor.p_value', nan):.3f}",
        ]
    if schema.AUDIT in kids:
        am = kids[schema.AUDIT].data.metrics
        out += ["", "## Source audit"]
        if "audit.meta.accuracy" in am:
            out.append(
                "- A random forest on the image's source signature alone (colour mode, size, format) predicts the "
                f"class with accuracy {am['audit.meta.accuracy']:.3f}: the higher, the more a model can score by "
                "source."
            )
        if "audit.source_from_features.accuracy" in am:
            out.append(
                "- The backbone's features predict the source with accuracy "
                f"{am['audit.source_from_features.accuracy']:.3f} "
                f"(majority {am.get('audit.source_majority', nan):.3f})."
            )
    return out
