"""Whole-study actions that chain the stages: `demo` (recipe -> search -> report) and the `ui` launcher."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Optional

from harness.paths import get_paths
from harness.recipe import Recipe, load_recipe


def compare_study(study_or_recipe: str, out: Optional[Path] = None) -> Path:
    """`harness compare`: a recipe file names its study and the models to expect; a bare name is a study."""
    from harness.report import compare

    path = Path(study_or_recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        recipe = load_recipe(path)
        return compare(recipe.study, out, expected=[m.key for m in recipe.models])
    return compare(study_or_recipe, out)


def run_study(recipe: Recipe, out: Optional[Path] = None) -> Path:
    from harness.report import compare
    from harness.search import tune

    tune(recipe)
    return compare(recipe.study, out, expected=[m.key for m in recipe.models])


def demo(recipe_path: Path) -> Path:
    """The embedded default, end to end: generated data, a search per model, the report."""
    return run_study(load_recipe(recipe_path))


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
