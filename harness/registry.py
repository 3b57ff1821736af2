"""The harness's models as standard MLflow models: logging (a pyfunc that answers class-named probability columns,
plus the standard `keras` flavor on the same file), the per-task `champion` alias, and `harness predict`.

A logged model loads without the harness: `mlflow.pyfunc.load_model`, `mlflow.keras.load_model`,
`mlflow.tensorflow.load_model` and `mlflow models serve` all work on its URI. Its `model_config` records the classes,
the image size and the colour policy, so a client (and `harness predict`) can prepare images as training did.
"""

from __future__ import annotations

import importlib.metadata
import logging
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import keras
import mlflow
import numpy as np

from harness import schema, tracking
from harness.errors import HarnessError
from harness.recipe import minimised

log = logging.getLogger(__name__)
SERVING_CODE = Path(__file__).with_name("serving_model.py")
CHAMPION = "champion"


class KerasWithClassColumns:
    """A flavor module for `mlflow.models.Model.log`: the pyfunc (models from code) and the standard `keras` flavor,
    both pointing at the same `.keras` file, so one model URI loads with every MLflow and Keras loader."""

    __name__ = "keras_with_class_columns"

    @staticmethod
    def save_model(path, mlflow_model, **kwargs):
        kwargs.pop("validate_serving_input", None)  # read by Model.log itself, unknown to pyfunc.save_model
        mlflow.pyfunc.save_model(path, mlflow_model=mlflow_model, **kwargs)
        # mlflow.keras.load_model reads <path>/artifacts/model.keras; save_format and keras_module make
        # mlflow.tensorflow.load_model (which reads this same flavor) take the Keras 3 file too.
        mlflow_model.add_flavor(
            "keras",
            data="artifacts",
            keras_version=keras.__version__,
            keras_backend=keras.backend.backend(),
            save_exported_model=False,
            save_format="keras",
            keras_module="keras",
        )
        mlflow_model.save(os.path.join(path, "MLmodel"))


def requirements() -> list[str]:
    """The installed TensorFlow distribution (tensorflow-cpu here, tensorflow on a GPU machine) and the rest."""
    tf = next((d for d in ("tensorflow", "tensorflow-cpu") if _installed(d)), "tensorflow")
    return [
        f"{tf}=={importlib.metadata.version(tf)}",
        f"keras=={keras.__version__}",
        f"mlflow=={mlflow.__version__}",
        "pandas",
        "numpy",
    ]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.version(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def input_example(size: int) -> np.ndarray:
    """One synthetic image (a grey ramp, no patient data) in exactly the form the model takes: (1, S, S, 3) float32
    of raw 0-255 RGB values."""
    ramp = np.linspace(0, 255, size).round().astype("float32")
    return np.broadcast_to(ramp[None, None, :, None], (1, size, size, 3)).copy()


def log_classifier(
    model: keras.Model,
    classes: list[str],
    image_size: int,
    colour: str,
    registered_model_name: str | None = None,
    **config,
) -> mlflow.models.model.ModelInfo:
    """Log (and register) a model of raw images as a standard MLflow model in the active run."""
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    log.info("Logging the model%s", f" and registering it as {registered_model_name}" if registered_model_name else "")
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, image_size, image_size, 3))]),
        outputs=Schema([ColSpec("double", c) for c in classes]),
    )
    with tempfile.TemporaryDirectory() as tmp:
        keras_file = os.path.join(tmp, "model.keras")
        model.save(keras_file)
        return Model.log(
            artifact_path=None,
            name="model",
            flavor=KerasWithClassColumns,
            python_model=str(SERVING_CODE),
            artifacts={"keras_model": keras_file},
            model_config={"classes": list(classes), "image_size": image_size, "colour": colour, **config},
            signature=signature,
            input_example=input_example(image_size),
            registered_model_name=registered_model_name,
            pip_requirements=requirements(),
        )


@dataclass
class Candidate:
    """A registered final model competing for its task's champion alias."""

    task: str
    model_key: str
    name: str  # its registered model
    version: str
    run_id: str
    objective: str
    value: float

    def better_than(self, other: Candidate) -> bool:
        return self.value < other.value if minimised(self.objective) else self.value > other.value


def choose(candidates: list[Candidate]) -> Candidate:
    """The best validation objective; ties keep the first (sorted by model key). Test metrics are never read."""
    best = candidates[0]
    for c in candidates[1:]:
        if c.better_than(best):
            best = c
    return best


def crown_champions(study: str, finals: list) -> dict[str, dict]:
    """Per task, give the final model with the best validation objective the alias `champion` on the task's
    registered model `<study>-<task>` (a version pointing at that model). The alias moves only when a strictly
    better model exists; returns per task what holds it and why."""
    c = tracking.client()
    by_task: dict[str, list[Candidate]] = {}
    for run in finals:
        name = run.data.tags.get(schema.REGISTERED_MODEL)
        found = (
            k.removeprefix(schema.SEARCH_PREFIX)
            for k in run.data.metrics
            if k.startswith(f"{schema.SEARCH_PREFIX}val_")
        )
        objective = next(found, None)
        if not name or objective is None:
            continue  # a `harness train` run: not registered, nothing chose it
        versions = c.search_model_versions(f"name = '{name}' and run_id = '{run.info.run_id}'")
        if not versions:
            continue
        by_task.setdefault(run.data.tags[schema.TASK], []).append(
            Candidate(
                run.data.tags[schema.TASK],
                run.data.tags[schema.MODEL_KEY],
                name,
                versions[0].version,
                run.info.run_id,
                objective,
                float(run.data.metrics[f"{schema.SEARCH_PREFIX}{objective}"]),
            )
        )
    out = {}
    for task, cands in sorted(by_task.items()):
        best = choose(sorted(cands, key=lambda x: x.model_key))
        task_name = f"{study}-{task}"
        current = _current(c, task_name)
        moved = current is None or (current.run_id != best.run_id and best.better_than(current))
        if moved:
            if c.search_registered_models(f"name = '{task_name}'") == []:
                c.create_registered_model(
                    task_name,
                    description=f"The champion of study {study}, {task}: the final "
                    "model with the best validation objective (harness compare).",
                )
            v = c.create_model_version(
                task_name,
                f"models:/{best.name}/{best.version}",
                run_id=best.run_id,
                tags={
                    "model_key": best.model_key,
                    "source_model": f"{best.name}/{best.version}",
                    "selection.objective": best.objective,
                    "selection.value": str(best.value),
                },
            )
            c.set_registered_model_alias(task_name, CHAMPION, v.version)
            current = _current(c, task_name)
            log.info("champion of %s: %s (%s %.4f)", task, best.model_key, best.objective, best.value)
        out[task] = {
            "uri": f"models:/{task_name}@{CHAMPION}",
            "version": current.version,
            "model_key": current.model_key,
            "source": current.name,
            "objective": current.objective,
            "value": current.value,
            "moved": moved,
            "candidates": len(cands),
        }
    return out


def _current(c, task_name: str) -> Candidate | None:
    """The version that holds the alias now, as a candidate (what chose it is recorded on its tags); `name` is the
    registered model version it points at."""
    try:
        v = c.get_model_version_by_alias(task_name, CHAMPION)
    except mlflow.exceptions.MlflowException:
        return None
    return Candidate(
        task_name,
        v.tags.get("model_key", "?"),
        v.tags.get("source_model", "?"),
        v.version,
        v.run_id,
        v.tags.get("selection.objective", "val_loss"),
        float(v.tags.get("selection.value", "nan")),
    )


def image_files(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Image files named or found (recursively, sorted) in folders, and one line per path that cannot be followed:
    a path that does not exist, a broken symbolic link (dangling, or a loop of links), a folder that cannot be
    listed, a link back to a folder it is inside (followed once, not forever)."""
    files, problems = [], []
    for p in paths:
        if p.is_dir():
            found: list[Path] = []
            _walk(p, {_inode(p): p}, found, problems)
            files += sorted(found)
        elif p.is_file():
            files.append(p)
        elif p.is_symlink():
            problems.append(_broken_link(p))
        else:
            problems.append(f"{p}: no such file or folder")
    return files, problems


def _inode(p: Path) -> tuple[int, int]:
    st = p.stat()
    return st.st_dev, st.st_ino


def _broken_link(p: Path) -> str:
    try:
        p.stat()
    except OSError as e:
        return f"{p}: broken symbolic link ({e.strerror or e})"
    return f"{p}: not a file or folder"


def _walk(folder: Path, ancestors: dict[tuple[int, int], Path], found: list[Path], problems: list[str]) -> None:
    """Image files under `folder`, following symbolic links (a linked folder of images is searched like any other).
    `ancestors` are the folders above on this path, by inode, so a link back to one of them is named, not walked
    in a circle."""
    from harness.data.scan import IMAGE_EXTS

    try:
        entries = sorted(folder.iterdir())
    except OSError as e:
        problems.append(f"{folder}: cannot be listed ({e.strerror or e})")
        return
    for f in entries:
        try:
            st = f.stat()
        except OSError as e:  # os.DirEntry-style is_file()/is_dir() would answer False here and skip it unseen
            problems.append(
                f"{f}: broken symbolic link ({e.strerror or e})" if f.is_symlink() else f"{f}: {e.strerror or e}"
            )
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in ancestors:
                problems.append(f"{f}: symbolic link loop (leads back to {ancestors[key]}), not followed")
            else:
                _walk(f, {**ancestors, key: f}, found, problems)
        elif f.suffix.lower() in IMAGE_EXTS:
            if stat.S_ISREG(st.st_mode):
                found.append(f)
            else:  # a pipe or a device: reading it could block, and it is no image file
                problems.append(f"{f}: not a regular file")


def load_for_images(model_uri: str):
    """(pyfunc model, its model_config) of a harness model, or one line saying why not."""
    from harness.paths import get_paths

    mlflow.set_tracking_uri(get_paths().tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except Exception as e:  # a wrong URI or a model that is not there: the user's input
        raise HarnessError(f"{model_uri}: cannot load ({str(e).splitlines()[0][:300]})") from None
    cfg = model.model_config or {}
    if "classes" not in cfg or "image_size" not in cfg:
        raise HarnessError(
            f"{model_uri}: no harness model_config (classes, image_size, colour): logged by an older "
            f"harness; load it with harness.load_model instead"
        )
    return model, cfg


def decode_for(cfg: dict, files: list[Path]) -> tuple[list[Path], np.ndarray, list[str]]:
    """(readable files, their images as the model's training decoded them, one line per unreadable file)."""
    from harness.data.images import decode
    from harness.paths import get_paths

    size, colour, cache = int(cfg["image_size"]), cfg.get("colour", "grey"), get_paths().image_cache
    good, arrays, problems = [], [], []
    for f in files:
        d = decode(f, size, colour, cache, min_side=1, max_pixels=60_000_000)
        if d.problem:
            problems.append(d.problem)
        else:
            good.append(f)
            arrays.append(d.array)
    return good, (np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)), problems


def predict_files(model_uri: str, paths: list[Path], batch_size: int = 32):
    """(a table of class probabilities per readable image, one line per image that could not be read). Images are
    decoded as training decoded them: the model's colour policy and size, from its `model_config`."""
    import pandas as pd

    model, cfg = load_for_images(model_uri)
    files, problems = image_files(paths)
    good, arrays, unreadable = decode_for(cfg, files)
    problems += unreadable
    frames = [model.predict(arrays[i : i + batch_size].astype("float32")) for i in range(0, len(arrays), batch_size)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=cfg["classes"])
    table.insert(0, "file", [str(f) for f in good])
    table["predicted"] = table[list(cfg["classes"])].idxmax(axis=1) if len(table) else []
    return table, problems


def explain_files(model_uri: str, paths: list[Path], out_dir: Path):
    """Grad-CAM overlays (PNG, one per readable image) of the predicted class, and a table of predictions with the
    share of each map outside the lung field; one line per unreadable file."""
    import pandas as pd
    from PIL import Image

    from harness.explain import gradcam, outside_share, overlay

    model, cfg = load_for_images(model_uri)
    keras_model = model.unwrap_python_model().model
    files, problems = image_files(paths)
    good, arrays, unreadable = decode_for(cfg, files)
    problems += unreadable
    classes = list(cfg["classes"])
    rows = []
    out_dir.mkdir(parents=True, exist_ok=True)
    if len(arrays):
        proba = model.predict(arrays.astype("float32"))[classes].to_numpy()
        pred = proba.argmax(axis=1)
        maps = gradcam(keras_model, arrays.astype("float32"), pred, len(classes))
        for f, a, cam, k, p, share in zip(good, arrays, maps, pred, proba, outside_share(maps)):
            target = out_dir / f"{f.stem}.gradcam.png"
            Image.fromarray(overlay(a, cam)).save(target)
            rows.append(
                {
                    "file": str(f),
                    "predicted": classes[k],
                    "probability": float(p[k]),
                    "outside_lung_share": float(share),
                    "overlay": str(target),
                }
            )
    return pd.DataFrame(rows, columns=["file", "predicted", "probability", "outside_lung_share", "overlay"]), problems
