"""The README's examples hold: the model URIs it names are the ones the registry writes."""

import re
from pathlib import Path

from harness.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def test_readme_champion_uris_name_the_registered_model_that_holds_the_alias():
    # crown_champions puts `champion` on `<study>-<task>`, never on a per-backbone `<study>-<task>-<backbone>`.
    demo = load_recipe(ROOT / "recipes" / "demo.yaml")
    holders = {f"{demo.study}-{task}" for task in demo.tasks}
    named = re.findall(r"models:/([^@\s\"'`]+)@champion", README.read_text())
    assert named and set(named) <= holders, sorted(set(named) - holders)
