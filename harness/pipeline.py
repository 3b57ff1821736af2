"""Whole-study actions that chain the stages: `demo` (recipe -> search -> report) and the `ui` launcher."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

from harness.paths import get_paths
from harness.recipe import load_recipe


def demo(recipe_path: Path) -> str:
    from harness.train import train

    recipe = load_recipe(recipe_path)
    for m in recipe.models:
        train(recipe, m.key)
    return recipe.study


def ui(port: int = 5000, study: Optional[str] = None) -> None:
    p = get_paths()
    url = f"http://127.0.0.1:{port}"
    if study:
        from harness import tracking

        exp = tracking.client().get_experiment_by_name(study)
        if exp is not None:
            url += f"/#/experiments/{exp.experiment_id}/runs"
    print(f"MLflow UI for {p.tracking_uri} at {url} (Ctrl-C to stop)", flush=True)
    subprocess.run([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", p.tracking_uri,
                    "--default-artifact-root", p.artifact_root.as_uri(), "--host", "127.0.0.1", "--port", str(port)])
