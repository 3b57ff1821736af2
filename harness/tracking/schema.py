"""The MLflow run tree is the interface between stages: one stage writes runs, tags, params and metrics that another
stage, the resume logic or the report reads back later, often from another process or another version of the
harness. This module owns the names of that interface: the run-kind tag and its values, the tag names read across
modules, and the metric/param prefixes written in one module and parsed in another. Nothing else spells them.

The values are part of every store written so far: changing one orphans the runs already recorded (a resume would
not find its finished stages, the report would not find its rows), so they stay byte-identical.
"""

from __future__ import annotations

# The tag that says what a run is; its values below.
KIND = "harness.kind"

SEARCH = "search"  # a model's parent run: its trials and stage runs are its children
TRIAL = "trial"  # one Keras Tuner trial (head or fine-tuning stage, told apart by STAGE)
FINAL = "final"  # the final model: fit, one test evaluation, registered (an ensemble's is one too)
TRAIN = "train"  # `harness train`: one fit without a search, never registered
BASELINE = "baseline"  # the floor: the linear probe on the same features
AUDIT = "audit"  # the audit of a search's features and splits
NESTED = "nested"  # the nested-cv estimate
FINETUNE = "finetune"  # a fine-tuning run cut short in older stores: discarded on resume like the stage runs
COMPARE = "compare"  # a report's run
BENCH = "bench"  # a benchmark of the lab (bench/), never part of a study

# Tags read back in another module than the one writing them.
PARENT = "mlflow.parentRunId"  # MLflow's own: a nested run's parent
STUDY = "study"
TASK = "task"
BACKBONE = "backbone"
MODEL_KEY = "model_key"
STAGE = "stage"  # of a trial: "head" (absent in older stores) or "finetune"
TRIAL_ID = "trial_id"
WORKER = "worker"
PRUNED = "pruned"  # the tag of a trial run, and the metric of a Keras Tuner trial, that pruning stopped early
REGISTERED_MODEL = "registered_model"
FINAL_STAGE = "final.stage"  # "head", "finetune" or "ensemble"
FINAL_MODE = "final.mode"
FINAL_MEMBERS = "final.members"
FINETUNE_CHOSEN = "finetune.chosen"
ENSEMBLE_MEMBERS = "ensemble.members"
ORACLE_PORT = "oracle.port"
ORACLE_STATE = "oracle.state"
DEVICE = "device"
DEVICE_NAME = "device.name"
FEATURE_CACHE = "feature_cache"
WEIGHTS = "weights"
WEIGHTS_SHA256 = "weights_sha256"
WEIGHTS_ORIGIN = "weights_origin"
SEARCH_OBJECTIVE = "search.objective"  # a param: the validation objective the search chose by

# Experiment tags: `<prefix><model key>` says why a model was skipped; `<prefix><port>` that a study's workers leave.
SKIPPED_PREFIX = "harness.skipped."
ORACLE_DONE_PREFIX = "harness.oracle."
BUDGET_EXCLUDED_PREFIX = "harness.budget_excluded."  # `<prefix><task>`: model keys over the champion's budget, why

# Metric/param/tag prefixes written in one module and parsed in another.
HP = "hp."  # params of trial and final runs: the chosen hyperparameters
BEST = "best."  # tags (the best hyperparameters) and metrics (objective, epoch, folds) of a search run
TRIAL_BEST = "best_"  # a trial's `best_<objective>`: logged last, its presence marks a complete trial record
CV_STD = "cv_std_"  # `cv_std_<objective>` of a trial; `best.cv_std_<objective>` of a search
SEARCH_PREFIX = "search."  # params of a search run and a final's `search.<objective>`, what the champion rule reads
FINETUNE_PREFIX = "finetune."  # the fine-tuning stage's metrics on a search run
NESTED_PREFIX = "nested."  # the nested estimate's metrics and params
TEST = "test."  # a final run's test-split metrics
VAL = "val."  # a final run's validation metrics
FT_HP = "ft_"  # the fine-tuning stage's hyperparameter names

# Calibration, operating point, serving cost (a final run's; absent in older stores: the report skips what is absent).
CALIBRATED = "_calibrated"  # split suffix: `val_calibrated`/`test_calibrated` metrics and prediction rows, the
#                             probabilities after the temperature fitted on the out-of-fold `val` rows
TEMPERATURE = "calibration.temperature"  # metric: the fitted temperature (1.0: none fitted, too few images)
OP_CLASS = "op.class"  # tag: the operating point's class; absent when the recipe asks for none
OP = "op."  # metrics `op.threshold`, `op.target_sensitivity`, `op.val.<m>` (out of fold), `op.test.<m>` with
#              <m> in sensitivity/specificity/ppv/npv (+ `_ci_low`/`_ci_high`) and tp/fp/tn/fn
MODEL_CARD = "model_card.md"  # artifact of a final run and of its registered model version
ONNX_ARTIFACT = "onnx"  # artifact folder of a final run: the ONNX model logged as an MLflow model
COST = "cost."  # metrics `cost.params`, `cost.keras_file_mb`, `cost.onnx_file_mb`, `cost.<runtime>.b<batch>.<stat>`
ONNX_PARITY = "onnx.parity"  # metric: largest absolute probability difference Keras vs ONNX Runtime on test images
INT8 = "_int8"  # split suffix: `test_int8` metrics and prediction rows of the INT8 dynamic-quantized ONNX model


def tag_filter(name: str, value: str) -> str:
    """An MLflow filter clause `tags.`name` = 'value'`: backticks, because the names hold dots."""
    return f"tags.`{name}` = '{value}'"


def kind_filter(kind: str) -> str:
    """The filter clause for runs of one kind: tags.`harness.kind` = 'trial'."""
    return tag_filter(KIND, kind)


def parent_filter(parent_run_id: str) -> str:
    """The filter clause for the children of one run."""
    return tag_filter(PARENT, parent_run_id)
