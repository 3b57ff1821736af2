"""The same 12-trial search of the demo recipe (its first model) with 1 worker and with 2 workers, on the local
SQLite store and on `harness server` backed by a throwaway PostgreSQL cluster: trials per minute and the ratios.
Trials per minute count the search alone (from the chief's first served trial to its last), not process start-up.

    python bench/distributed.py
    python bench/distributed.py --trials 12 --epochs 40
"""

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml

from harness.tracking import schema

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres(folder: Path) -> tuple[str, list, Path]:
    """(URI, stop command) of a fresh cluster in `folder`, started as the postgres user when running as root."""

    def find(name):
        return shutil.which(name) or str(sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))[-1])

    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    folder.mkdir(parents=True, exist_ok=True)
    if run_as:
        shutil.chown(folder, "postgres", "postgres")
    port, data = free_port(), folder / "data"
    subprocess.run(
        [*run_as, find("initdb"), "-D", str(data), "-U", "harness", "--auth=trust"], check=True, capture_output=True
    )
    subprocess.run(
        [
            *run_as,
            find("pg_ctl"),
            "-D",
            str(data),
            "-l",
            str(folder / "log"),
            "-w",
            "-o",
            f"-c listen_addresses=127.0.0.1 -p {port} -k {folder}",
            "start",
        ],
        check=True,
        capture_output=True,
    )
    subprocess.run(
        [*run_as, find("createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "harness", "mlflow"],
        check=True,
        capture_output=True,
    )
    return (
        f"postgresql://harness@127.0.0.1:{port}/mlflow",
        [*run_as, find("pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
        folder,
    )


def search(recipe: Path, home: Path, cache: Path, workers: int, uri: str) -> dict:
    env = {
        **os.environ,
        "HARNESS_HOME": str(home),
        "HARNESS_CACHE": str(cache),
        "MLFLOW_TRACKING_URI": uri,
        "PYTHONUNBUFFERED": "1",
        "HARNESS_WEIGHTS_MIRROR": "http://127.0.0.1:9/",
    }
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "harness.cli", "tune", str(recipe), "--workers", str(workers)],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.time() - t0
    if res.returncode != 0:
        raise SystemExit(f"{workers} worker(s) on {uri}: the search failed\n{res.stdout[-3000:]}{res.stderr[-3000:]}")
    import mlflow

    c = mlflow.MlflowClient(uri)
    exp = c.get_experiment_by_name(yaml.safe_load(recipe.read_text())["study"])
    trials = c.search_runs([exp.experiment_id], filter_string=schema.kind_filter(schema.TRIAL))
    start = min(t.info.start_time for t in trials) / 1000
    end = max(t.info.end_time for t in trials) / 1000
    return {
        "trials": len(trials),
        "search_s": end - start,
        "trials_per_min": 60 * len(trials) / (end - start),
        "wall_s": wall,
        "workers_seen": sorted({t.data.tags.get(schema.WORKER, "?") for t in trials}),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--epochs", type=int, default=None, help="default: the demo recipe's")
    a = ap.parse_args()
    base = Path(tempfile.mkdtemp(prefix="dist-bench-"))
    raw = yaml.safe_load((ROOT / "recipes" / "demo.yaml").read_text())
    raw["models"] = raw["models"][:1]
    raw["search"].update(max_trials=a.trials, tuner="random")
    if a.epochs:
        raw["training"]["epochs"] = a.epochs
    rows = {}
    # The temporary folder itself goes to the postgres user: a folder inside a root-only (0700) one is unreachable.
    uri_pg, stop_pg, pg_folder = postgres(Path(tempfile.mkdtemp(prefix="dist-pg-")))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "server", "--port", str(port), "--backend-store-uri", uri_pg],
        env={**os.environ, "HARNESS_HOME": str(base / "srv")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while True:
            try:
                if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.time() > deadline:
                    raise SystemExit("harness server did not start") from None
                time.sleep(0.5)
        for store in ("sqlite", "postgresql"):
            for workers in (1, 2):
                name = f"bench-{store}-{workers}"
                raw["study"] = name
                recipe = base / f"{name}.yaml"
                recipe.write_text(yaml.safe_dump(raw))
                home = base / name
                uri = f"sqlite:///{home / 'mlflow.db'}" if store == "sqlite" else f"http://127.0.0.1:{port}"
                home.mkdir(parents=True)
                rows[(store, workers)] = search(recipe, home, base / "cache", workers, uri)
                r = rows[(store, workers)]
                print(
                    f"{store:<10} {workers} worker(s): {r['trials']} trials in {r['search_s']:.0f} s = "
                    f"{r['trials_per_min']:.1f} trials/min (whole command {r['wall_s']:.0f} s)",
                    flush=True,
                )
    finally:
        server.terminate()
        server.wait(timeout=30)
        subprocess.run(stop_pg, capture_output=True)
        shutil.rmtree(pg_folder, ignore_errors=True)
    ratios = {
        f"{s}: 2 workers / 1": rows[(s, 2)]["trials_per_min"] / rows[(s, 1)]["trials_per_min"]
        for s in ("sqlite", "postgresql")
    }
    ratios.update(
        {
            f"{w} worker(s): postgresql / sqlite": rows[("postgresql", w)]["trials_per_min"]
            / rows[("sqlite", w)]["trials_per_min"]
            for w in (1, 2)
        }
    )
    for k, v in ratios.items():
        print(f"{k}: {v:.2f}x")
    print(
        json.dumps(
            {
                "machine_cores": os.cpu_count(),
                "trials": a.trials,
                "rows": {f"{s}/{w}": r for (s, w), r in rows.items()},
                "ratios": ratios,
            }
        )
    )


if __name__ == "__main__":
    main()
