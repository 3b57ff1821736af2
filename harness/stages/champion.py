"""Champion stage, the study's last before its report: each task's `champion` alias moves to the final model with
the best validation objective among the study's newest final runs (ensembles included), never by a test metric.
The report only reads where the alias is (`harness.tracking.registry.champions`)."""

from __future__ import annotations

import logging

from harness.tracking.registry import crown_champions, latest_finals

log = logging.getLogger(__name__)


def crown_study(study: str) -> dict[str, dict]:
    """Per task, what holds `champion` after this study's models, and whether it moved now."""
    crowned = crown_champions(study, latest_finals(study))
    for task, c in crowned.items():
        log.info("%s: champion %s (%s), %s", task, c["model_key"], c["uri"], "moved" if c["moved"] else "kept")
    return crowned
