"""The report of a study: `compare(study)` reads the study's MLflow runs (`collect`) and writes report.md and a
self-contained report.html (+ PNGs), logged as a `compare` run. The answer comes first (per task: the champion, its
test accuracy with an exact CI against its floor, the runner-up and the nested estimate, in a sentence and a forest
plot), the details below it, folded. Read-only: the registry's champion alias is read, never moved.

Modules: `collect` (MLflow -> `Study`), `common` (formats, ordering, test metrics), `answer` (per-task answer),
`sections` (comparisons across models), `per_model` (each model's details), `provenance` (audit, timing, data),
`figures`, `render` (blocks -> Markdown and HTML), `compare` (the whole report, and the `extra_sections` hook)."""

from harness.report.common import NESTED_SETS, paired, test_metrics  # noqa: F401  (bench/lab.py reads these)
from harness.report.compare import compare

__all__ = ["compare"]
