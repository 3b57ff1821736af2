"""Wall time and peak RSS of a whole study (tune + compare), by phase.

python bench/study.py --recipe recipes/challenge.yaml --only task1-efficientnet_lite0 --only task2-efficientnet_lite0
"""

import argparse
import logging
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.bench import main_study
from harness.cli import setup_logging

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "challenge.yaml")
    ap.add_argument("--only", action="append", default=None, help="task-backbone; repeatable")
    ap.add_argument("--max-trials", type=int, default=None)
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args()
    setup_logging(logging.INFO)  # trial lines and warnings, as the CLI shows them
    main_study(a.recipe, a.only, a.max_trials, {"data.root": a.data_root})
