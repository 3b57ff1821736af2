"""Recipes: the one typed place for configuration. A YAML study file is validated here, before any work.

`load_recipe(path, overrides)` applies command-line overrides to the raw YAML *before* validation, so an override is
checked exactly like a value in the file. Errors come back as one line naming the file and the field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from harness.errors import HarnessError

# Each backbone's native input size: its images are resized to it unless the recipe or the model says otherwise.
NATIVE_SIZE = {
    "vgg19": 224,
    "densenet121": 224,
    "efficientnet_lite0": 224,
    "efficientnet_lite1": 240,
    "efficientnet_lite2": 260,
}
BACKBONES = tuple(NATIVE_SIZE)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Synthetic(Strict):
    """Generated phantom data (the embedded default): no files need to exist beforehand."""

    per_class: int = Field(24, ge=4, le=2000)
    size: int = Field(128, ge=32, le=1024)
    seed: int = 0


class DataConfig(Strict):
    root: Path | None = None  # task folders are relative to this (else to the recipe's folder)
    synthetic: Synthetic | None = None  # when set, root is the generated demo data
    image_size: int | None = Field(None, ge=32, le=1024)  # None: each backbone's native size
    colour: Literal["grey", "rgb"] = "grey"  # grey: colour mode is a source shortcut in the COVID data
    val_fraction: float = Field(0.2, gt=0, lt=0.5)
    test_fraction: float = Field(0.2, ge=0, lt=0.5)  # carved from train when a task has no test folder
    seed: int = 42
    group_pattern: str | None = None  # regex on the file name; group 1 (or the match) = patient id
    on_bad_file: Literal["fail", "skip"] = "fail"
    min_side: int = Field(32, ge=1)
    max_pixels: int = Field(60_000_000, ge=1)  # decompression-bomb guard
    max_per_class: int | None = Field(None, ge=2)  # a quick look: at most this many images per class (seeded draw)


class TaskConfig(Strict):
    train_dir: Path
    test_dir: Path | None = None  # used when it exists under the data root, else a test split is carved
    classes: list[str] | None = None  # a subset of the class folders; default all

    @field_validator("classes")
    @classmethod
    def _two_or_more(cls, v):
        if v is not None and len(set(v)) < 2:
            raise ValueError("a task needs at least two classes")
        return v


class HeadConfig(Strict):
    pooling: Literal["flatten", "avg"] = "flatten"
    units: list[int] = Field(default_factory=lambda: [256, 256, 64])  # hidden layers; dropout after all but the last
    dropout: float = Field(0.25, ge=0, lt=1)

    @field_validator("units")
    @classmethod
    def _positive(cls, v):
        if any(u < 1 for u in v):
            raise ValueError("units must be positive")
        return v


class TrainingConfig(Strict):
    epochs: int = Field(10, ge=1, le=1000)
    # Augmentation strength while training, 0 = off: 1 = rotation up to 10 degrees, zoom and shift up to 10% and 5%,
    # contrast up to 20% (no flips: a chest X-ray has a side). On, images go through the backbone every epoch.
    augment: float = Field(0.0, ge=0, le=1)
    # Heads on cached features also train on this many views of every training image (moved at `views_strength` on
    # augment's scale, as `views_kind` says; kept in the feature store like the originals). Validation, test, the
    # floor and the served model see the originals. 0 = off; average pooling only (the views are kept as pooled
    # vectors).
    views: int = Field(0, ge=0, le=24)
    views_strength: float = Field(0.5, gt=0, le=1)
    # fixed: the same transforms for every image, one kind each; random: every image its own rotation, zoom, shift
    # and contrast together, drawn from its content hash (so still extracted once and cached).
    views_kind: Literal["fixed", "random"] = "fixed"
    batch_size: int = Field(16, ge=1, le=4096)
    optimizer: Literal["adam", "adamw", "sgd", "rmsprop"] = "adam"  # Keras' defaults but the learning rate
    learning_rate: float = Field(1e-4, gt=0, lt=1)


class FloatRange(Strict):
    min: float
    max: float
    step: float | None = None
    log: bool = False

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class IntRange(Strict):
    min: int = Field(ge=1)
    max: int = Field(ge=1)

    @model_validator(mode="after")
    def _ordered(self):
        if self.min > self.max:
            raise ValueError("min must not exceed max")
        return self


class FinetuneSearch(Strict):
    """Second search stage, from the best head: how much of the backbone to unfreeze (0 = frozen, a count of top
    blocks, `half` or `all`), at which learning rate, with how much augmentation, and the small-data fine-tuning
    options a practitioner expects (each a list the search chooses from, or one value the recipe sets): per-block
    (discriminative) learning rates, warm-up then cosine decay, label smoothing, an exponential moving average of
    the weights, early stopping on the folds' objective. BatchNorm stays frozen and in inference mode. Same
    objective and folds as the head search; ends after `max_trials`, or before a trial that the time budget cannot
    hold."""

    blocks: list[int | Literal["half", "all"]] = Field(default_factory=lambda: [0, 1, 2])
    learning_rate: list[float] = Field(default_factory=lambda: [1e-5, 1e-4])
    augment: list[float] = Field(default_factory=lambda: [0.0, 0.5, 1.0])
    # Discriminative learning rates (ULMFiT): the k-th unfrozen block below the top trains at learning_rate *
    # lr_decay**k (the head at the full rate); 1.0 = one rate for all.
    lr_decay: list[float] = Field(default_factory=lambda: [1.0])
    # The learning rate rises linearly from 0 over `warmup_epochs`, then stays (constant) or follows a cosine to 0
    # at `epochs` (cosine). 0 and constant: the rate is flat, as before these options.
    warmup_epochs: int = Field(0, ge=0, le=1000)
    schedule: Literal["constant", "cosine"] = "constant"
    # Training loss only: the objective (val_loss) is always the plain cross-entropy, so trials stay comparable.
    label_smoothing: list[float] = Field(default_factory=lambda: [0.0])
    # Momentum of an exponential moving average of the trainable weights, evaluated and kept in their place
    # (0 = off); e.g. 0.9 averages over about the last 10 steps.
    ema: list[float] = Field(default_factory=lambda: [0.0])
    epochs: int = Field(5, ge=1, le=1000)
    # Early stopping: a trial ends after this many epochs without a better fold-mean objective (None: all epochs);
    # the epoch count it keeps is always the folds' best, as without it.
    patience: int | None = Field(None, ge=1)
    max_trials: int = Field(6, ge=1, le=1000)
    time_budget_minutes: float = Field(15.0, gt=0)
    # When the stage's best trial replaces the head-only model. one_se (the one-standard-error rule, Hastie et al.,
    # Elements of Statistical Learning 7.10): only when it beats the head by more than the standard error of its own
    # fold mean, because the best of several trials scored on the folds the head was chosen on is flattered by the
    # choice. any_gain: whenever it beats the head at all. With one validation split (cv_folds 1) there is no
    # standard error and the two agree.
    accept: Literal["one_se", "any_gain"] = "one_se"
    # Activation cache: when some top blocks train and the rest stays frozen, the frozen bottom's output for every
    # image and for `cache_views` augmented views of it is computed once and kept in the feature store, and epochs
    # run only the top (each training image seen as one of its cached views per epoch, drawn afresh every epoch).
    # false: every epoch runs the whole backbone on freshly resampled images.
    cache: bool = True
    cache_views: int = Field(8, ge=1, le=64)
    # median: a trial whose fold-mean objective, from epoch `prune_after` on, is worse than the median of the
    # completed trials' at the same epoch stops there (the median stopping rule of Google Vizier), once
    # `prune_min_trials` trials have completed; it is recorded as pruned and never chosen. none: every trial runs.
    prune: Literal["none", "median"] = "median"
    prune_after: int = Field(2, ge=1)
    prune_min_trials: int = Field(3, ge=1)

    @field_validator("blocks")
    @classmethod
    def _non_negative(cls, v):
        if not v or any(isinstance(b, int) and b < 0 for b in v):
            raise ValueError("blocks: one or more counts of top blocks (0 or more), 'half' or 'all'")
        return v

    @field_validator("augment")
    @classmethod
    def _strengths(cls, v):
        if not v or any(not 0 <= a <= 1 for a in v):
            raise ValueError("augment: one or more strengths between 0 and 1")
        return v

    @field_validator("lr_decay")
    @classmethod
    def _decays(cls, v):
        if not v or any(not 0 < d <= 1 for d in v):
            raise ValueError("lr_decay: one or more factors in (0, 1]")
        return v

    @field_validator("label_smoothing")
    @classmethod
    def _smoothing(cls, v):
        if not v or any(not 0 <= a < 0.5 for a in v):
            raise ValueError("label_smoothing: one or more values in [0, 0.5)")
        return v

    @field_validator("ema")
    @classmethod
    def _momenta(cls, v):
        if not v or any(not 0 <= a < 1 for a in v):
            raise ValueError("ema: one or more momenta in [0, 1) (0 = off)")
        return v


class EnsembleConfig(Strict):
    """A candidate of its own for the task's champion: the average of the final models of several recipe models of
    one task (`members`, by key), scored by the same validation objective on their out-of-fold predictions."""

    task: str
    members: list[str] = Field(min_length=2)
    name: str | None = None

    @property
    def key(self) -> str:
        return self.name or f"{self.task}-ensemble"


def minimised(metric: str) -> bool:
    """Whether lower is better for a metric the harness ranks by: a loss is minimised, any other objective (accuracy)
    maximised. The one statement of that rule, for the tuner's objective, early stopping, fold curves, the registry's
    champion and the report's orderings alike."""
    return metric.endswith("loss")


class SearchConfig(Strict):
    tuner: Literal["random", "bayesian", "hyperband"] = "random"
    max_trials: int = Field(10, ge=1, le=10000)
    objective: Literal["val_loss", "val_accuracy"] = "val_loss"
    dropout: FloatRange = FloatRange(min=0.1, max=0.5, step=0.05)
    depth: IntRange = IntRange(min=1, max=3)
    units: list[int] = Field(default_factory=lambda: [64, 128, 256])
    learning_rate: list[float] | FloatRange = Field(default_factory=lambda: [1e-4, 5e-4, 1e-3])
    pooling: list[Literal["flatten", "avg"]] = Field(default_factory=lambda: ["avg"])
    seed: int = 42
    max_consecutive_failures: int = Field(3, ge=1)
    hyperband_factor: int = Field(3, ge=2)
    # Objective of a trial: 1 = the loss (or accuracy) on the validation split; K > 1 = the mean over K stratified,
    # patient-grouped folds of train+validation, every trial training K heads.
    cv_folds: int = Field(1, ge=1, le=20)
    # With cv_folds > 1, the final model: `ensemble` = the K fold heads averaged (every labelled image used, the
    # out-of-fold predictions kept as the validation record), `refit` = one head on all of train+validation for the
    # epoch count the folds chose.
    final: Literal["ensemble", "refit"] = "ensemble"
    # K >= 2: the whole head search is repeated in an outer K-fold loop over train+validation, and the outer folds'
    # accuracy estimates how good this procedure is (the test split is not used). 0 = off.
    nested_cv: int = Field(0, ge=0, le=20)
    # With a fine-tuning stage, the nested estimate repeats it too, inside every outer fold (K times its cost), so
    # it estimates the procedure that makes the final model and says, paired on the same images, whether the stage
    # helps; false estimates the head search alone.
    nested_finetune: bool = True
    finetune: FinetuneSearch | None = None

    @field_validator("nested_cv")
    @classmethod
    def _outer_folds(cls, v):
        if v == 1:
            raise ValueError("nested_cv needs at least 2 outer folds (0 = off)")
        return v


class OperatingPoint(Strict):
    """`{class: covid, sensitivity: 0.95}`: the decision threshold on P(class), chosen on the final model's
    out-of-fold predictions as the largest that reaches the sensitivity there."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    class_: str = Field(alias="class", min_length=1)
    sensitivity: float = Field(gt=0, le=1)


class EvaluationConfig(Strict):
    # Temperature scaling (one scalar T dividing the log-probabilities), fitted on the final model's out-of-fold
    # validation predictions, never the test split, and applied inside the logged model: served and predicted
    # probabilities are the calibrated ones (`val_calibrated.*`, `test_calibrated.*` beside `val.*`, `test.*`).
    calibrate: bool = True
    # A clinical operating point for every task holding its class (tasks without it are told so in the log); the
    # logged model adds a `decision` column (1: P(class) >= threshold) beside its probabilities.
    operating_point: OperatingPoint | None = None
    # Test-time augmentation: the final model's predictions also averaged over this many augmented copies of each
    # validation and test image (`random_views` at `tta_strength`: rotation, zoom, shift and contrast in one
    # resampling, drawn from the image's hash; no flips), logged as their own metric set, in the nested estimate
    # too. 0 = off.
    tta: int = Field(0, ge=0, le=64)
    tta_strength: float = Field(0.5, gt=0, le=1)
    # A head trained on views (training.views) also predicts each validation and test image as the mean over
    # the image and the same views of it, read from the feature store (no extraction): `val_view_tta.*`, and
    # `test_view_tta.*`, beside `val.*` and `test.*`. The served model predicts the image alone.
    view_tta: bool = False


class ModelConfig(Strict):
    task: str
    backbone: Literal[BACKBONES]  # type: ignore[valid-type]
    weights: str = "imagenet"  # imagenet | none | path to a .weights.h5 / .h5 file
    image_size: int | None = Field(None, ge=32, le=1024)  # overrides data.image_size for this model
    colour: Literal["grey", "rgb"] | None = None  # overrides data.colour: a study can compare the two policies
    # false: when its ImageNet weights can be neither found nor fetched, the study skips this model (and says so)
    # instead of stopping; for the Keras applications whose files a fresh machine may not reach.
    required: bool = True
    trainable: bool = False  # True fine-tunes the whole backbone from the start (the seed's DenseNet121)
    name: str | None = None
    head: HeadConfig | None = None
    training: TrainingConfig | None = None
    finetune: FinetuneSearch | None = None  # this model's fine-tuning stage (default: the recipe's search.finetune)

    @property
    def key(self) -> str:
        return self.name or f"{self.task}-{self.backbone}"


class ExportConfig(Strict):
    # Every final model also exported to ONNX (tf2onnx) and logged beside the Keras model as `onnx` (a pyfunc on ONNX
    # Runtime, calibration and decision included); the export fails the stage when its probabilities differ from
    # Keras' by more than 1e-4 on the test images.
    onnx: bool = True
    # An INT8 dynamic-quantized variant, scored on the test split (`test_int8.*`) and paired with the float model.
    int8: bool = False
    # Serving cost (`cost.*`): calls timed per runtime at batch 1 and 32, median and p95, on the study's machine.
    latency_repeats: int = Field(20, ge=3, le=1000)


class RegistryConfig(Strict):
    # Crown under a budget: the champion is the best validation objective among models whose batch-1 median latency
    # (`runtime`, measured at export) is within it; the report names what it excluded. None: no budget.
    max_latency_ms: float | None = Field(None, gt=0)
    runtime: Literal["onnx", "keras"] = "onnx"


class Recipe(Strict):
    study: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    data: DataConfig = DataConfig()
    tasks: dict[str, TaskConfig]
    models: list[ModelConfig] = Field(min_length=1)
    head: HeadConfig = HeadConfig()
    training: TrainingConfig = TrainingConfig()
    search: SearchConfig = SearchConfig()
    evaluation: EvaluationConfig = EvaluationConfig()
    export: ExportConfig = ExportConfig()
    registry: RegistryConfig = RegistryConfig()
    ensembles: list[EnsembleConfig] = Field(default_factory=list)
    # Where Keras application weights are fetched from when absent: a base URL (http(s):// or file://) laid out like
    # Keras' own (<base>/vgg19/<file>); default $HARNESS_WEIGHTS_MIRROR, else Keras' URL.
    weights_mirror: str | None = None
    source: Path | None = Field(None, exclude=True)  # the file it came from, for messages and relative paths

    @model_validator(mode="after")
    def _models_name_tasks(self):
        for i, m in enumerate(self.models):
            if m.task not in self.tasks:
                raise ValueError(f"models.{i}.task: unknown task '{m.task}' (tasks: {', '.join(self.tasks)})")
        keys = [m.key for m in self.models]
        if len(keys) != len(set(keys)):
            raise ValueError("models: two models share a name; give one a distinct 'name'")
        s = self.search
        for i, m in enumerate(self.models):
            t = self.training_for(m)
            where = f"models.{i}.training" if m.training else "training"
            if t.views and (t.augment or m.trainable):
                raise ValueError(
                    f"{where}.views trains heads on cached features, which "
                    f"{'augment' if t.augment else 'a trainable backbone'} bypasses: use one"
                )
            if self.evaluation.view_tta and not t.views:
                raise ValueError(f"evaluation.view_tta averages over the views of {where}.views, which is 0")
            if t.views and ("flatten" in s.pooling or self.head_for(m).pooling == "flatten"):
                raise ValueError(
                    f"{where}.views needs average pooling (search.pooling [avg], head.pooling avg): views are kept as "
                    "pooled vectors only"
                )
        self._check_ensembles()
        if s.cv_folds > 1 and s.final == "refit" and (s.finetune or any(m.finetune for m in self.models)):
            raise ValueError(
                "search.finetune needs final: ensemble (or cv_folds: 1): a refit on all of "
                "train+validation leaves no fold to choose the fine-tuning on"
            )
        return self

    def _check_ensembles(self) -> None:
        models = {m.key: m for m in self.models}
        for i, e in enumerate(self.ensembles):
            where = f"ensembles.{i}"
            if e.task not in self.tasks:
                raise ValueError(f"{where}.task: unknown task '{e.task}' (tasks: {', '.join(self.tasks)})")
            if e.key in models or e.key in [x.key for x in self.ensembles[:i]]:
                raise ValueError(f"{where}.name: '{e.key}' is already a model's or an ensemble's name")
            if len(set(e.members)) != len(e.members):
                raise ValueError(f"{where}.members: a model is named twice")
            for j, k in enumerate(e.members):
                if k not in models:
                    raise ValueError(f"{where}.members.{j}: no model '{k}' (models: {', '.join(models)})")
                if models[k].task != e.task:
                    raise ValueError(f"{where}.members.{j}: '{k}' is a model of {models[k].task}, not {e.task}")
            shapes = {(self.image_size_for(models[k]), self.colour_for(models[k])) for k in e.members}
            if len(shapes) > 1:
                size, colour = self.image_size_for, self.colour_for
                seen = ", ".join(f"{k}: {size(models[k])} px {colour(models[k])}" for k in e.members)
                raise ValueError(
                    f"{where}.members: the members take images of different sizes or colour policies ({seen}); "
                    "an averaged model takes one input: set their image_size"
                )

    def model(self, key: str | None = None) -> ModelConfig:
        if key is None:
            return self.models[0]
        for m in self.models:
            if key in (m.key, f"{m.task}/{m.backbone}"):
                return m
        raise HarnessError(f"{self.source}: no model '{key}' (models: {', '.join(m.key for m in self.models)})")

    def head_for(self, m: ModelConfig) -> HeadConfig:
        return m.head or self.head

    def finetune_for(self, m: ModelConfig) -> FinetuneSearch | None:
        return m.finetune or self.search.finetune

    def colour_for(self, m: ModelConfig) -> str:
        return m.colour or self.data.colour

    def image_size_for(self, m: ModelConfig) -> int:
        return m.image_size or self.data.image_size or NATIVE_SIZE[m.backbone]

    def training_for(self, m: ModelConfig) -> TrainingConfig:
        return m.training or self.training

    def resolved(self) -> dict:
        """The fully resolved configuration, as logged with every run."""
        return self.model_dump(mode="json", by_alias=True)


def _set_dotted(raw: dict, dotted: str, value) -> None:
    keys = dotted.split(".")
    node = raw
    for k in keys[:-1]:
        if isinstance(node, list):
            node = node[int(k)]
        else:
            node = node.setdefault(k, {})
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def _format_error(path: Path, err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        parts.append(f"{loc}: {msg}" if not msg.startswith(loc) else msg)
    return f"{path}: " + "; ".join(parts)


def load_recipe(path: str | Path, overrides: dict | None = None) -> Recipe:
    """Read, override and validate a recipe; relative data paths are anchored to the recipe's folder."""
    path = Path(path)
    if not path.is_file():
        raise HarnessError(f"{path}: recipe file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise HarnessError(f"{path}:{where} not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"{path}: a recipe must be a YAML mapping")
    for dotted, value in (overrides or {}).items():
        if value is not None:
            try:
                _set_dotted(raw, dotted, value)
            except (IndexError, ValueError, AttributeError, TypeError):
                raise HarnessError(f"{path}: cannot override '{dotted}'") from None
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as e:
        raise HarnessError(_format_error(path, e)) from None
    recipe.source = path.resolve()
    if recipe.data.root is not None and not recipe.data.root.is_absolute():
        recipe.data.root = (path.resolve().parent / recipe.data.root).resolve()
    for i, m in enumerate(recipe.models):
        if m.weights not in ("imagenet", "none"):
            wp = Path(m.weights).expanduser()
            if not wp.is_absolute():
                wp = (path.resolve().parent / wp).resolve()
            if not wp.is_file():
                raise HarnessError(f"{path}: models.{i}.weights: file not found: {wp}")
            m.weights = str(wp)
    return recipe
