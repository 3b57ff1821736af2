"""What lets a study stop and continue: one process per study at a time (a lock file naming the holder's pid and
host), and each search's fingerprint of what it ran on (a resume against a changed recipe is refused, saying what
changed). The interrupt and the atomic state files every process shares are `harness.process`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from harness.errors import HarnessError
from harness.process import pid_alive

log = logging.getLogger(__name__)


class StudyLock:
    """`<tuner dir>/<study>/.lock`, created exclusively, holding {pid, host, started, command}. A second process on
    the same study is refused; a lock left by a process that no longer runs on this host is taken over."""

    def __init__(self, folder: Path, study: str):
        self.path = folder / ".lock"
        self.study = study
        self.held = False

    def __enter__(self) -> StudyLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S"),
            "command": " ".join(sys.argv)[:500],
        }
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder and holder.get("host") == me["host"] and not pid_alive(int(holder.get("pid", -1))):
                    log.warning(
                        "study '%s': taking over the lock of pid %s, which is no longer running",
                        self.study,
                        holder.get("pid"),
                    )
                    self.path.unlink(missing_ok=True)
                    continue
                who = (
                    f"pid {holder.get('pid')} on host {holder.get('host')} since {holder.get('started')}"
                    if holder
                    else "another process"
                )
                raise HarnessError(
                    f"study '{self.study}' is in use by {who} ({self.path}); wait for it to finish, "
                    f"or delete the lock file if that process is gone"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            self.held = True
            return self
        raise HarnessError(f"{self.path}: could not take the study lock")

    def _holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def __exit__(self, *exc) -> None:
        if self.held:
            with contextlib.suppress(OSError):
                self.path.unlink()
            self.held = False


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fingerprint(r, m, prep=None) -> dict[str, str]:
    """What a search's results depend on, part by part, each as a short hash: from the recipe alone (checked before
    any image is decoded), and with `prep` also the images' contents and the weights file. `search.max_trials` is
    not in it: raising it on resume runs only the new trials, as Keras Tuner does."""
    space = r.search.model_dump(mode="json", exclude={"max_trials", "nested_cv", "finetune"})
    known = {"images": prep.task.content_key(), "weights file": prep.weights.id} if prep is not None else {}
    return {
        "data settings": _digest({**r.data.model_dump(mode="json"), "task": r.tasks[m.task].model_dump(mode="json")}),
        **known,
        "backbone": _digest({"backbone": m.backbone, "trainable": m.trainable, "weights": m.weights}),
        "colour policy": r.colour_for(m),
        "image size": str(r.image_size_for(m)),
        "search space": _digest(space),
        "head and training": _digest(
            {"head": r.head_for(m).model_dump(mode="json"), "training": r.training_for(m).model_dump(mode="json")}
        ),
        "fine-tuning": _digest(finetune_settings(r.finetune_for(m))),
        "nested estimate": str(r.search.nested_cv),
        "evaluation": _digest(evaluation_settings(r.evaluation)),
    }


def evaluation_settings(cfg) -> dict:
    """The evaluation options, those that came after stores were written (calibration, operating point) left out at
    their defaults, so a study begun before them still resumes."""
    later = {"calibrate": True, "operating_point": None}
    return {k: v for k, v in cfg.model_dump(mode="json", by_alias=True).items() if later.get(k, object()) != v}


# Fine-tuning options that came after stores were written (whole-backbone fine-tuning): at their defaults they are
# left out of the fingerprint, so a study begun before them still resumes; set to anything else, they count.
LATER_FINETUNE_OPTIONS = (
    "lr_decay",
    "warmup_epochs",
    "schedule",
    "label_smoothing",
    "ema",
    "patience",
    "cache",
    "cache_views",
    "prune",
    "prune_after",
    "prune_min_trials",
)


def finetune_settings(cfg) -> dict | None:
    if cfg is None:
        return None
    settings = cfg.model_dump(mode="json")
    defaults = type(cfg)().model_dump(mode="json")
    return {k: v for k, v in settings.items() if k not in LATER_FINETUNE_OPTIONS or v != defaults[k]}


def changed_parts(old: dict[str, str], new: dict[str, str]) -> list[str]:
    """The parts of `new` that differ from `old` (parts one of them does not have are not compared)."""
    return [k for k in new if k in old and old[k] != new[k]]
