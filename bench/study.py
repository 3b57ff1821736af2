"""A study on its data: by default the selection protocol (single-split winner, CV-selected winner, fine-tuned
winner and nested estimate per task, each against the floor), with every model's accuracy, the pairwise McNemar
tests, wall time by phase and peak RSS; `--as-is` runs the recipe once, as `harness study` would, timed by phase.

    python bench/study.py                                   # challenge recipe, the shared data
    python bench/study.py --only task2-efficientnet_lite0 --only task2-efficientnet_lite1
    python bench/study.py --recipe recipes/demo.yaml --as-is
"""

import argparse
import logging
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.cli import setup_logging

from lab import main_selection, main_study  # bench/lab.py: bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "challenge.yaml")
    ap.add_argument("--only", action="append", default=None, help="task-backbone; repeatable")
    ap.add_argument("--max-trials", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--as-is", action="store_true", help="run the recipe once, no selection protocol")
    a = ap.parse_args()
    setup_logging(logging.INFO)  # trial lines and warnings, as the CLI shows them
    (main_study if a.as_is else main_selection)(a.recipe, a.only, a.max_trials, {"data.root": a.data_root})
