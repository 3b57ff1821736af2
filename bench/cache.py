"""Seconds per trial through the backbone (as the seed) vs on cached features, same data and epochs; the ratio.

python bench/cache.py --recipe recipes/challenge.yaml --model task2-vgg19 --weights none --epochs 2
python bench/cache.py            # demo data, EfficientNet-Lite0, 224 px
"""

import argparse
import logging
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)
from harness.cli import setup_logging

from lab import main_cache  # bench/lab.py: bench/ is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    ap.add_argument("--model", default=None, help="task-backbone (default: the recipe's first model)")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--weights", default=None, help="override the model's weights (imagenet | none | path)")
    ap.add_argument("--data-root", default=None)
    a = ap.parse_args()
    setup_logging(logging.INFO)  # trial lines and warnings, as the CLI shows them
    from harness.recipe import load_recipe

    idx = next(i for i, m in enumerate(load_recipe(a.recipe).models) if a.model in (None, m.key))
    overrides = {"data.image_size": a.image_size, "data.root": a.data_root, f"models.{idx}.weights": a.weights}
    main_cache(a.recipe, a.model, a.epochs, overrides)
