"""Whole-study actions: `harness study` (the stages, then the report), `demo` (the same on the embedded recipe) and
`compare` (the report of a study or recipe)."""

from __future__ import annotations

from pathlib import Path

from harness.recipe import Recipe, load_recipe


def compare_study(study_or_recipe: str, out: Path | None = None) -> Path:
    """`harness compare`: a recipe file names its study and the models to expect; a bare name is a study."""
    from harness.report import compare

    path = Path(study_or_recipe)
    if path.suffix in (".yaml", ".yml") or path.is_file():
        recipe = load_recipe(path)
        return compare(recipe.study, out, expected=[m.key for m in recipe.models])
    return compare(study_or_recipe, out)


def run_study(recipe: Recipe, out: Path | None = None, resume: bool = False, restart: bool = False) -> Path:
    from harness.report import compare
    from harness.study.run import tune

    tune(recipe, resume=resume, restart=restart)
    return compare(recipe.study, out, expected=[m.key for m in recipe.models])


def demo(recipe_path: Path) -> Path:
    """The embedded default, end to end: generated data, a search per model, the report. Run again, it continues
    (finished searches are skipped), so a second `make demo` only rebuilds the report."""
    return run_study(load_recipe(recipe_path), resume=True)
