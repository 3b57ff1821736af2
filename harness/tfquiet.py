"""Keeps TensorFlow's start-up lines off the command line.

`import tensorflow` (2.21) has its C++ libraries write absl's "WARNING: All log messages before absl::InitializeLog()
is called are written to STDERR" and the oneDNN notice ("oneDNN custom operations are on ..."), twice each, before
TensorFlow reads any logging setting: with TF_CPP_MIN_LOG_LEVEL=3, GLOG_minloglevel=3, ABSL_MIN_LOG_LEVEL=3 or
TF_CPP_MAX_VLOG_LEVEL=-1 set before the import, all four lines still appear (measured). So the CLI runs that one
import with file descriptor 2 pointed at a temporary file, then writes every other line back to stderr: a real
error during the import is still seen. The CLI installs this unless HARNESS_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import os
import sys
import tempfile

NOISE = (
    b"All log messages before absl::InitializeLog() is called are written to STDERR",
    b"oneDNN custom operations are on",
)


@contextlib.contextmanager
def _without_noise():
    """File descriptor 2 (where C++ writes) into a temporary file; on the way out, the lines that are not NOISE
    back to it."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as caught:
        os.dup2(caught.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()  # Python's own writes during the import sit in its buffer until now
            os.dup2(saved, 2)
            os.close(saved)
            caught.seek(0)
            kept = b"".join(ln for ln in caught.read().splitlines(keepends=True) if not any(n in ln for n in NOISE))
            if kept:
                os.write(2, kept)


class _QuietImport(importlib.abc.MetaPathFinder):
    """Finds `tensorflow` with the other finders and runs its module code under `_without_noise`; one use only."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "tensorflow":
            return None
        sys.meta_path.remove(self)
        for finder in sys.meta_path:
            spec = finder.find_spec(fullname, path, target) if hasattr(finder, "find_spec") else None
            if spec is not None:
                break
        else:
            return None
        if spec.loader is not None and hasattr(spec.loader, "exec_module"):
            real = spec.loader.exec_module

            def exec_module(module):
                with _without_noise():
                    real(module)

            spec.loader.exec_module = exec_module
        return spec


def install() -> None:
    """Quiet the first `import tensorflow` of this process (nothing to do once TensorFlow is loaded)."""
    if "tensorflow" in sys.modules or any(isinstance(f, _QuietImport) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _QuietImport())
