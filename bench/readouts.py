"""Would another readout of the frozen backbone help? Linear-probe accuracy of the top map average-pooled (what the
harness trains on) against earlier stages, max pooling, image halves and (--clahe) contrast-equalised images, under
repeated patient-grouped 5-fold CV of train+validation (the test split is not read), at several regularisation
strengths; with --augment K also the top average with test-time augmentation, trained on augmented copies, and both.
Skips when the shared challenge data is absent.

    python bench/readouts.py                                    # Task 2, Lite0, the shared challenge data
    python bench/readouts.py --model task2-efficientnet_lite1 --repeats 5
    python bench/readouts.py --augment 6          # + the top average trained on / TTA over 6 augmented copies
    python bench/readouts.py --augment 6 --fixed  # the same, 6 fixed views (the same transforms for every image)
    python bench/readouts.py --also task2-efficientnet_lite1 --also task2-efficientnet_lite2  # backbones together
    python bench/readouts.py --clahe           # + the top average of CLAHE-equalised images (needs scikit-image)
    python bench/readouts.py --recipe recipes/demo.yaml --model task1-efficientnet_lite0 --repeats 1 --c 0.1
"""

import argparse
import logging
import sys
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.cli import setup_logging
from harness.errors import HarnessError

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "challenge.yaml")
    ap.add_argument("--model", default="task2-efficientnet_lite0", help="task-backbone")
    ap.add_argument("--c", type=float, action="append", default=None, help="probe C; repeatable (0.01 0.1 1)")
    ap.add_argument("--repeats", type=int, default=5, help="different 5-fold splits averaged")
    ap.add_argument("--augment", type=int, default=0, help="augmented copies per image (0 = none)")
    ap.add_argument(
        "--strength", type=float, default=0.5, help="their augmentation strength (as the fine-tuning stage)"
    )
    ap.add_argument("--fixed", action="store_true", help="the same transforms for every image, not random copies")
    ap.add_argument(
        "--also",
        action="append",
        default=[],
        help="another model of the task (repeatable): its backbone's top "
        "average concatenated with this one's, and its probe averaged with this one's",
    )
    ap.add_argument("--clahe", action="store_true", help="also the top average of the images CLAHE-equalised first")
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args()
    setup_logging(logging.INFO)
    from harness.data import data_root
    from harness.recipe import load_recipe

    from readouts_lab import print_readouts, readout_benchmark  # bench/readouts_lab.py, beside this script

    try:
        recipe = load_recipe(a.recipe, {"data.root": a.data_root})
        if a.data_root is None and recipe.data.synthetic is None and not data_root(recipe).is_dir():
            print(f"skipped: no data at {data_root(recipe)} (pass --data-root)")
            sys.exit(0)
        print_readouts(
            readout_benchmark(
                recipe, a.model, a.c or [0.01, 0.1, 1.0], a.repeats, a.augment, a.strength, a.fixed, a.also, a.clahe
            )
        )
    except HarnessError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
