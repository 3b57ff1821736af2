"""`harness predict` and `harness explain`: a harness model (any MLflow model URI) on image files and folders, every
file that cannot be read named in one line."""

from __future__ import annotations

import logging
import stat
from pathlib import Path

import mlflow
import numpy as np

from harness.errors import HarnessError

log = logging.getLogger(__name__)


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


def load_for_images(model_uri: str, *, runtime: str = "keras"):
    """(pyfunc model, its model_config) of a harness model, or one line saying why not; `runtime` "onnx": the ONNX
    export logged beside it (`runs:/<its run>/onnx`)."""
    from harness.paths import get_paths

    mlflow.set_tracking_uri(get_paths().tracking_uri)
    try:
        if runtime == "onnx":
            model_uri = onnx_uri(model_uri)
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


def onnx_uri(model_uri: str) -> str:
    """The ONNX export of the run that logged `model_uri` (a registered version, alias, or run model)."""
    run_id = mlflow.models.get_model_info(model_uri).run_id
    if not run_id:
        raise HarnessError(f"{model_uri}: no run logged it, so no ONNX export beside it")
    return f"runs:/{run_id}/onnx"


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


def predict_files(model_uri: str, paths: list[Path], batch_size: int = 32, *, runtime: str = "keras"):
    """(a table of class probabilities per readable image, one line per image that could not be read). Images are
    decoded as training decoded them: the model's colour policy and size, from its `model_config`."""
    import pandas as pd

    model, cfg = load_for_images(model_uri, runtime=runtime)
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

    from harness.evaluation.gradcam import gradcam, outside_share, overlay

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
