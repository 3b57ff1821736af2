"""Seconds of one recipe trial through the harness against a lower bound (the same head trained by a plain compiled
loop on preloaded tensors), for an avg and a flatten head; the ratios; and what Keras' model.fit took for the same.

    python bench/trial.py --recipe recipes/challenge.yaml --model task2-efficientnet_lite0
    python bench/trial.py            # demo data, its first model
"""

import argparse
import logging
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.cli import setup_logging

from lab import main_trial  # bench/lab.py: bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    ap.add_argument("--model", default=None, help="task-backbone (default: the recipe's first model)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args()
    setup_logging(logging.INFO)  # trial lines and warnings, as the CLI shows them
    main_trial(a.recipe, a.model, a.repeats, {"data.root": a.data_root})
