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

import mlflow
import numpy as np

from harness import schema, tracking
from harness.baseline import floor_model
from harness.data.splits import cv_folds
from harness.errors import HarnessError
from harness.evaluate import log_predictions, mcnemar, metrics, prediction_rows
from harness.finalize import ensemble_predict, fit_best, tta_predict, view_tta_predict
from harness.finetune import finetune_stage
from harness.prepared import Prepared
from harness.search import HeadHyperModel, best_of, make_tuner, run_search, search_folds

log = logging.getLogger(__name__)


def nested_estimate(prep: Prepared, parent_run_id: str, k_outer: int, project_dir, resume: bool) -> dict:
    recipe, mcfg, t = prep.recipe, prep.mcfg, prep.task
    space, tcfg = recipe.search, recipe.training_for(mcfg)
    mode = "single" if space.cv_folds == 1 else space.final
    ft_cfg = recipe.finetune_for(mcfg) if space.nested_finetune else None
    pool = t.pool()
    try:
        outer = cv_folds(pool, t.y, t.groups, k_outer, space.seed + 1)
    except ValueError as e:
        raise HarnessError(f"{mcfg.key}: search.nested_cv {k_outer}: {e}") from None
    proba = np.zeros((len(t.y), prep.n_classes))
    floor = np.zeros_like(proba)
    # The outer models' averaged predictions (name -> how), each a metric set of its own.
    averaged = {}
    if recipe.evaluation.tta:
        averaged["nested_tta"] = lambda final, held: ensemble_predict(prep, final, held, tta_predict)
    if recipe.evaluation.view_tta and prep.views is not None:
        averaged["nested_view_tta"] = lambda final, held: ensemble_predict(prep, final, held, view_tta_predict)
    extra = {name: np.zeros_like(proba) for name in averaged}
    head = np.zeros_like(proba) if ft_cfg is not None else None  # the outer models before their fine-tuning stage
    stages = []
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
            inner = search_folds(prep, space.cv_folds, space.seed + o, pool=inner_pool)
            outer_dir = project_dir.with_name(f"{project_dir.name}-nested{o}")
            tuner = make_tuner(
                HeadHyperModel(prep, space),
                space,
                outer_dir,
                resume,
                None,
                tcfg.epochs,
                space.max_trials,
                inner,
            )
            run_search(tuner)
            found = best_of(tuner, mcfg.key)
            best, score = found.values, found.score
            final = fit_best(prep, found, space, tcfg, inner, mode, refit_pool=inner_pool)
            if ft_cfg is not None:
                head[held] = ensemble_predict(prep, final, held)
                at = f"outer{o}.{schema.FINETUNE_PREFIX}"
                final, stage, _ = finetune_stage(prep, final, ft_cfg, tcfg, inner, None, outer_dir, resume, prefix=at)
                stages.append(stage)
            proba[held] = ensemble_predict(prep, final, held)
            for name, predict_held in averaged.items():
                extra[name][held] = predict_held(final, held)
            lr_floor = floor_model().fit(prep.pooled[inner_pool], t.y[inner_pool])
            floor[held] = lr_floor.predict_proba(prep.pooled[held])
            acc = float((proba[held].argmax(1) == t.y[held]).mean())
            mlflow.log_metrics(
                {f"outer{o}.accuracy": acc, f"outer{o}.{space.objective}": score, f"outer{o}.n": len(held)}
            )
            log.info(
                "nested %s: outer fold %d/%d accuracy %.3f (n=%d), inner best %s",
                mcfg.key,
                o + 1,
                len(outer),
                acc,
                len(held),
                best,
            )
        m = metrics(t.y[pool], proba[pool], t.classes, seed=recipe.data.seed)
        fm = metrics(t.y[pool], floor[pool], t.classes, seed=recipe.data.seed)
        paired = mcnemar(proba[pool].argmax(1) == t.y[pool], floor[pool].argmax(1) == t.y[pool])
        mlflow.log_metrics(
            {
                **{f"{schema.NESTED_PREFIX}{k}": v for k, v in m.items() if np.isfinite(v)},
                **{f"{schema.NESTED_PREFIX}floor.{k}": v for k, v in fm.items() if np.isfinite(v)},
                f"{schema.NESTED_PREFIX}vs_floor.p_value": paired["p_value"],
                f"{schema.NESTED_PREFIX}vs_floor.only_tuned": paired["a_only"],
                f"{schema.NESTED_PREFIX}vs_floor.only_floor": paired["b_only"],
            }
        )
        rows = prediction_rows(t, pool, proba[pool], "nested") + prediction_rows(t, pool, floor[pool], "nested_floor")
        if head is not None:
            hm = metrics(t.y[pool], head[pool], t.classes, seed=recipe.data.seed)
            vs_head = mcnemar(proba[pool].argmax(1) == t.y[pool], head[pool].argmax(1) == t.y[pool])
            mlflow.log_metrics(
                {
                    **{f"nested_head.{k}": v for k, v in hm.items() if np.isfinite(v)},
                    f"{schema.NESTED_PREFIX}{schema.FINETUNE_PREFIX}outer_chosen": stages.count("finetune"),
                    f"{schema.NESTED_PREFIX}vs_head.p_value": vs_head["p_value"],
                    f"{schema.NESTED_PREFIX}vs_head.only_finetuned": vs_head["a_only"],
                    f"{schema.NESTED_PREFIX}vs_head.only_head": vs_head["b_only"],
                }
            )
            rows += prediction_rows(t, pool, head[pool], "nested_head")
            log.info(
                "nested %s: the fine-tuning stage chosen in %d of %d outer folds; %.3f with it against %.3f before it "
                "(exact McNemar p %.3f)",
                mcfg.key,
                stages.count("finetune"),
                len(outer),
                m["accuracy"],
                hm["accuracy"],
                vs_head["p_value"],
            )
        for name, averaged_proba in extra.items():
            vm = metrics(t.y[pool], averaged_proba[pool], t.classes, seed=recipe.data.seed)
            right = averaged_proba[pool].argmax(1) == t.y[pool]
            vs_floor = mcnemar(right, floor[pool].argmax(1) == t.y[pool])
            vs_plain = mcnemar(right, proba[pool].argmax(1) == t.y[pool])
            mlflow.log_metrics(
                {
                    **{f"{name}.{k}": v for k, v in vm.items() if np.isfinite(v)},
                    f"{name}.vs_floor.p_value": vs_floor["p_value"],
                    f"{name}.vs_image_alone.p_value": vs_plain["p_value"],
                    f"{name}.vs_image_alone.only_averaged": vs_plain["a_only"],
                    f"{name}.vs_image_alone.only_image": vs_plain["b_only"],
                }
            )
            rows += prediction_rows(t, pool, averaged_proba[pool], name)
            log.info(
                "nested %s: %s %.3f [%.3f, %.3f] (McNemar p %.3f against the image alone, %.3f against the floor)",
                mcfg.key,
                name,
                vm["accuracy"],
                vm["accuracy_cp_low"],
                vm["accuracy_cp_high"],
                vs_plain["p_value"],
                vs_floor["p_value"],
            )
        log_predictions(rows, "nested_predictions.csv.gz")
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
