"""Nested cross-validation: how good is the procedure (head search + final model), as opposed to how good one model
is on one test split. The search and the final fit are repeated in an outer K-fold loop over train+validation (the
test split is never read); every image of train+validation is predicted once, by the model chosen without it. The
floor is fitted on the same outer folds, so the two are paired on every one of those images.

With a fine-tuning stage (and `search.nested_finetune`, the default) every outer fold runs it too, from its own
best heads on its own inner folds, so the estimate covers the procedure that makes the final model; the same outer
folds' head-only models are kept as `nested_head.*`, paired with it on every image: does the stage help. With
`evaluation.tta` / `evaluation.view_tta` the same outer models also predict each held-out image averaged over its
random augmented copies (`nested_tta.*`) / its training views (`nested_view_tta.*`): more estimates at no extra
training, each paired with the image alone and with the floor on every image.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import mlflow
import numpy as np

from harness.data.splits import cv_folds
from harness.errors import HarnessError
from harness.evaluation.metrics import log_predictions, mcnemar, metrics, prediction_rows
from harness.features.prepared import Prepared
from harness.stages.finalize import ensemble_predict, fit_best, tta_predict, view_tta_predict
from harness.stages.finetune import finetune_stage
from harness.stages.floor import floor_model
from harness.tracking import runs as tracking
from harness.tracking import schema
from harness.training.search import HeadHyperModel, best_of, make_tuner, run_search, search_folds

log = logging.getLogger(__name__)


@dataclass
class OuterPredictions:
    """Every pool image's predictions by the outer model that did not see it: the procedure's, the floor's, the
    head-only model's before a fine-tuning stage, and each averaged variant's."""

    proba: np.ndarray
    floor: np.ndarray
    head: np.ndarray | None
    extra: dict[str, np.ndarray]
    stages: list[str] = field(default_factory=list)  # per outer fold: "finetune" or "head"


def averaged_predictors(prep: Prepared) -> dict:
    """The outer models' averaged predictions (name -> how), each a metric set of its own."""
    ev, out = prep.recipe.evaluation, {}
    if ev.tta:
        out["nested_tta"] = lambda final, held: ensemble_predict(prep, final, held, tta_predict)
    if ev.view_tta and prep.views is not None:
        out["nested_view_tta"] = lambda final, held: ensemble_predict(prep, final, held, view_tta_predict)
    return out


def nested_estimate(prep: Prepared, parent_run_id: str, k_outer: int, project_dir, resume: bool) -> dict:
    """The `nested-cv` run under `parent_run_id`: the procedure repeated in `k_outer` outer folds, its pooled
    out-of-fold accuracy with exact CI, paired with the floor (and the head-only models, and averaged variants)."""
    recipe, mcfg, t = prep.recipe, prep.mcfg, prep.task
    space = recipe.search
    mode = "single" if space.cv_folds == 1 else space.final
    ft_cfg = recipe.finetune_for(mcfg) if space.nested_finetune else None
    pool = t.pool()
    try:
        outer = cv_folds(pool, t.y, t.groups, k_outer, space.seed + 1)
    except ValueError as e:
        raise HarnessError(f"{mcfg.key}: search.nested_cv {k_outer}: {e}") from None
    zeros = np.zeros((len(t.y), prep.n_classes))
    averaged = averaged_predictors(prep)
    preds = OuterPredictions(
        zeros.copy(), zeros.copy(), zeros.copy() if ft_cfg is not None else None, {n: zeros.copy() for n in averaged}
    )
    with tracking.run(
        f"nested-cv {mcfg.key}",
        nested=True,
        tags={schema.KIND: schema.NESTED, schema.PARENT: parent_run_id, **tracking.model_tags(recipe, mcfg)},
    ):
        mlflow.log_params(
            {
                f"{schema.NESTED_PREFIX}outer_folds": len(outer),
                f"{schema.NESTED_PREFIX}inner": f"{space.cv_folds} fold(s), {space.max_trials} trials, final {mode}"
                + (f", fine-tuning stage of up to {ft_cfg.max_trials} trials" if ft_cfg is not None else ""),
            }
        )
        for o, (inner_pool, held) in enumerate(outer):
            outer_dir = project_dir.with_name(f"{project_dir.name}-nested{o}")
            outer_fold(prep, o, len(outer), inner_pool, held, outer_dir, resume, preds, averaged)
        m, fm, paired = log_pooled(prep, pool, preds)
    log.info(
        "nested %s: accuracy %.3f [%.3f, %.3f] over %d images (floor %.3f, McNemar p %.3f)",
        mcfg.key,
        m["accuracy"],
        m["accuracy_cp_low"],
        m["accuracy_cp_high"],
        m["n"],
        fm["accuracy"],
        paired["p_value"],
    )
    return {**m, "floor_accuracy": fm["accuracy"], "p_vs_floor": paired["p_value"]}


def outer_fold(
    prep: Prepared, o: int, k: int, inner_pool, held, outer_dir, resume: bool, preds: OuterPredictions, averaged
) -> None:
    """One outer fold: the head search and final fit (and fine-tuning stage) on its inner folds, its held-out
    images predicted by what they chose, and the floor fitted on the same inner pool."""
    recipe, mcfg, t = prep.recipe, prep.mcfg, prep.task
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    mode = "single" if space.cv_folds == 1 else space.final
    inner = search_folds(prep, space.cv_folds, space.seed + o, pool=inner_pool)
    tuner = make_tuner(
        HeadHyperModel(prep, space),
        space,
        outer_dir,
        parent_run_id=None,  # untracked: the nested run records what each outer fold chose
        resume=resume,
        epochs=tcfg.epochs,
        max_trials=space.max_trials,
        folds=inner,
    )
    run_search(tuner)
    found = best_of(tuner, mcfg.key)
    final = fit_best(prep, found, space, tcfg, inner, mode, refit_pool=inner_pool)
    if preds.head is not None:
        preds.head[held] = ensemble_predict(prep, final, held)
        at = f"outer{o}.{schema.FINETUNE_PREFIX}"
        ft_cfg = recipe.finetune_for(mcfg)
        final, stage, _ = finetune_stage(prep, final, ft_cfg, tcfg, inner, None, outer_dir, resume, prefix=at)
        preds.stages.append(stage)
    preds.proba[held] = ensemble_predict(prep, final, held)
    for name, predict_held in averaged.items():
        preds.extra[name][held] = predict_held(final, held)
    lr_floor = floor_model().fit(prep.pooled[inner_pool], t.y[inner_pool])
    preds.floor[held] = lr_floor.predict_proba(prep.pooled[held])
    acc = float((preds.proba[held].argmax(1) == t.y[held]).mean())
    mlflow.log_metrics(
        {f"outer{o}.accuracy": acc, f"outer{o}.{space.objective}": found.score, f"outer{o}.n": len(held)}
    )
    log.info(
        "nested %s: outer fold %d/%d accuracy %.3f (n=%d), inner best %s",
        mcfg.key,
        o + 1,
        k,
        acc,
        len(held),
        found.values,
    )


def log_pooled(prep: Prepared, pool, preds: OuterPredictions) -> tuple[dict, dict, dict]:
    """The pooled metrics of the procedure and the floor, paired; the head-only and averaged comparisons; the
    predictions file. Returns (procedure metrics, floor metrics, McNemar against the floor)."""
    t, seed = prep.task, prep.recipe.data.seed
    y = t.y[pool]
    m = metrics(y, preds.proba[pool], t.classes, seed=seed)
    fm = metrics(y, preds.floor[pool], t.classes, seed=seed)
    right = preds.proba[pool].argmax(1) == y
    paired = mcnemar(right, preds.floor[pool].argmax(1) == y)
    mlflow.log_metrics(
        {
            **{f"{schema.NESTED_PREFIX}{k}": v for k, v in m.items() if np.isfinite(v)},
            **{f"{schema.NESTED_PREFIX}floor.{k}": v for k, v in fm.items() if np.isfinite(v)},
            f"{schema.NESTED_PREFIX}vs_floor.p_value": paired["p_value"],
            f"{schema.NESTED_PREFIX}vs_floor.only_tuned": paired["a_only"],
            f"{schema.NESTED_PREFIX}vs_floor.only_floor": paired["b_only"],
        }
    )
    rows = prediction_rows(t, pool, preds.proba[pool], "nested") + prediction_rows(
        t, pool, preds.floor[pool], "nested_floor"
    )
    if preds.head is not None:
        rows += log_vs_head(prep, pool, preds, m)
    for name, averaged_proba in preds.extra.items():
        rows += log_averaged(prep, pool, name, averaged_proba, preds)
    log_predictions(rows, "nested_predictions.csv.gz")
    return m, fm, paired


def log_vs_head(prep: Prepared, pool, preds: OuterPredictions, m: dict) -> list:
    """Does the fine-tuning stage help: the outer models with it against the same models before it."""
    t, y = prep.task, prep.task.y[pool]
    hm = metrics(y, preds.head[pool], t.classes, seed=prep.recipe.data.seed)
    vs_head = mcnemar(preds.proba[pool].argmax(1) == y, preds.head[pool].argmax(1) == y)
    chosen = preds.stages.count("finetune")
    mlflow.log_metrics(
        {
            **{f"nested_head.{k}": v for k, v in hm.items() if np.isfinite(v)},
            f"{schema.NESTED_PREFIX}{schema.FINETUNE_PREFIX}outer_chosen": chosen,
            f"{schema.NESTED_PREFIX}vs_head.p_value": vs_head["p_value"],
            f"{schema.NESTED_PREFIX}vs_head.only_finetuned": vs_head["a_only"],
            f"{schema.NESTED_PREFIX}vs_head.only_head": vs_head["b_only"],
        }
    )
    log.info(
        "nested %s: the fine-tuning stage chosen in %d of %d outer folds; %.3f with it against %.3f before it "
        "(exact McNemar p %.3f)",
        prep.mcfg.key,
        chosen,
        len(preds.stages),
        m["accuracy"],
        hm["accuracy"],
        vs_head["p_value"],
    )
    return prediction_rows(t, pool, preds.head[pool], "nested_head")


def log_averaged(prep: Prepared, pool, name: str, averaged_proba: np.ndarray, preds: OuterPredictions) -> list:
    """An averaged variant (TTA, view TTA) of the same outer models, paired with the image alone and the floor."""
    t, y = prep.task, prep.task.y[pool]
    vm = metrics(y, averaged_proba[pool], t.classes, seed=prep.recipe.data.seed)
    right = averaged_proba[pool].argmax(1) == y
    vs_floor = mcnemar(right, preds.floor[pool].argmax(1) == y)
    vs_plain = mcnemar(right, preds.proba[pool].argmax(1) == y)
    mlflow.log_metrics(
        {
            **{f"{name}.{k}": v for k, v in vm.items() if np.isfinite(v)},
            f"{name}.vs_floor.p_value": vs_floor["p_value"],
            f"{name}.vs_image_alone.p_value": vs_plain["p_value"],
            f"{name}.vs_image_alone.only_averaged": vs_plain["a_only"],
            f"{name}.vs_image_alone.only_image": vs_plain["b_only"],
        }
    )
    log.info(
        "nested %s: %s %.3f [%.3f, %.3f] (McNemar p %.3f against the image alone, %.3f against the floor)",
        prep.mcfg.key,
        name,
        vm["accuracy"],
        vm["accuracy_cp_low"],
        vm["accuracy_cp_high"],
        vs_plain["p_value"],
        vs_floor["p_value"],
    )
    return prediction_rows(t, pool, averaged_proba[pool], name)
