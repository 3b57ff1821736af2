"""MLproject entry points. MLflow passes every declared parameter, empty ones included, so this drops the empty
options (and turns `--resume true|false` into the flag) and hands the rest to the same `harness` CLI."""

from __future__ import annotations

import os
import sys

from harness.cli import app

FLAGS = {"--resume", "--restart"}


def to_cli_args(argv: list[str]) -> list[str]:
    args, i = [], 0
    while i < len(argv):
        tok = argv[i]
        if tok.startswith("--") and i + 1 < len(argv):
            value = argv[i + 1]
            if tok in FLAGS:
                args += [tok] if value.lower() in ("true", "1", "yes") else []
            elif value != "":
                args += [tok, value]
            i += 2
        else:
            args.append(tok)
            i += 1
    return args


def main(argv: list[str]) -> None:
    # `mlflow run` opens a run of its own and exports its id; the harness logs into the study's experiment with its
    # own run tree, so that id is taken out of the environment and the outer run only points at the study.
    outer = os.environ.pop("MLFLOW_RUN_ID", None)
    args = to_cli_args(argv)
    try:
        app(args=args, prog_name="harness")
    finally:
        if outer:
            from harness.tracking import runs as tracking

            tracking.client().set_tag(outer, "harness.command", " ".join(["harness"] + args))


if __name__ == "__main__":
    main(sys.argv[1:])
