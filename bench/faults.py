"""Kill a study with SIGKILL at seeded random moments (extraction, trials, refit, registration, report), resume it
after each kill, and compare its end state with an uninterrupted run of the same recipe in a store of its own:
same trial ids and hyperparameters, one FINISHED run per trial, one final run and one model version per model, no
run left RUNNING, the same test metrics. Prints kills survived, trials lost, trials duplicated, and one JSON line.

    python bench/faults.py                      # the demo recipe, 6 kills, seed 0
    python bench/faults.py --kills 8 --seed 3
"""

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness.tracking import schema

ROOT = Path(__file__).resolve().parents[1]
# The log line that opens each phase (the harness logs it as the phase starts).
PHASES = {
    "extraction": "Preparing ",
    "trials": "head trial ",
    "refit": "Final model ",
    "registration": "Logging the model",
    "report": "Report of study",
}


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def study(recipe: Path, home: Path, cache: Path, kill_at: tuple[str, int, float] | None) -> tuple[bool, float]:
    """Run `harness study RECIPE --resume` until it ends or, with kill_at = (phase, n, delay), until `delay` seconds
    after the n-th start of that phase, when it is killed with SIGKILL. Returns (killed, seconds)."""
    env = {**os.environ, "HARNESS_HOME": str(home), "HARNESS_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)
    t0 = time.time()
    proc = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "study", str(recipe), "--resume"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen, lines = 0, []
    try:
        for line in proc.stdout:
            lines.append(line)
            if kill_at and PHASES[kill_at[0]] in line:
                seen += 1
                if seen == kill_at[1]:
                    time.sleep(kill_at[2])
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
                        return True, time.time() - t0
    except BaseException:  # the bench stopped (Ctrl-C, SIGTERM, a timeout): the study in its own session stops too
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    proc.wait()
    if proc.returncode != 0:
        raise SystemExit(f"the study failed (exit {proc.returncode}) in {home}:\n{''.join(lines[-40:])}")
    return False, time.time() - t0


def end_state(home: Path, name: str) -> dict:
    """What the store holds at the end: per model its trials (id -> hyperparameters, statuses), final runs, model
    versions and test metrics; runs left RUNNING."""
    os.environ["HARNESS_HOME"] = str(home)
    import mlflow

    c = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = c.get_experiment_by_name(name)
    runs = c.search_runs([exp.experiment_id], max_results=50000)
    models: dict[str, dict] = {}
    parents = {
        r.info.run_id: r.data.tags.get(schema.MODEL_KEY) for r in runs if r.data.tags.get(schema.KIND) == schema.SEARCH
    }
    for r in runs:
        kind, key = (
            r.data.tags.get(schema.KIND),
            r.data.tags.get(schema.MODEL_KEY) or parents.get(r.data.tags.get(schema.PARENT)),
        )
        if key is None:
            continue
        m = models.setdefault(key, {"trials": {}, "finals": [], "versions": 0, "test": {}})
        if kind == schema.TRIAL:
            tid = f"{r.data.tags.get(schema.STAGE, 'head')}/{r.data.tags[schema.TRIAL_ID]}"
            m["trials"].setdefault(tid, []).append(
                (r.info.status, {k: v for k, v in r.data.params.items() if k.startswith(schema.HP)})
            )
        elif kind == schema.FINAL:
            m["finals"].append(r.info.status)
            m["test"] = {
                k: v for k, v in r.data.metrics.items() if k in (f"{schema.TEST}accuracy", f"{schema.TEST}loss")
            }
            m["versions"] = len(c.search_model_versions(f"name = '{r.data.tags[schema.REGISTERED_MODEL]}'"))
    return {"models": models, "running": sum(r.info.status == "RUNNING" for r in runs)}


def compare(ref: dict, got: dict) -> dict:
    lost = duplicated = changed_hp = 0
    problems = []
    for key, m in ref["models"].items():
        g = got["models"].get(key, {"trials": {}, "finals": [], "versions": 0, "test": {}})
        for tid, [(_, hp)] in m["trials"].items():
            runs = g["trials"].get(tid, [])
            lost += not runs
            duplicated += max(0, len(runs) - 1)
            if runs and (runs[0][1] != hp or runs[0][0] != "FINISHED"):
                changed_hp += 1
        if g["finals"] != ["FINISHED"] or g["versions"] != 1:
            problems.append(f"{key}: final runs {g['finals']}, model versions {g['versions']}")
        for k, v in m["test"].items():
            if abs(g["test"].get(k, float("nan")) - v) > 1e-6 or g["test"].get(k) is None:
                problems.append(f"{key}: {k} {g['test'].get(k)} vs {v} uninterrupted")
    return {
        "trials_lost": lost,
        "trials_duplicated": duplicated,
        "trials_differing": changed_hp,
        "running_left": got["running"],
        "problems": problems,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--recipe", type=Path, default=ROOT / "recipes" / "demo.yaml")
    ap.add_argument("--kills", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="keep the two stores in this folder")
    a = ap.parse_args()
    signal.signal(signal.SIGTERM, _interrupt)  # so `timeout` or `kill` reach the finally that stops the study
    rng = random.Random(a.seed)
    # The phases in the order a study meets them (each resumed run goes on from where the last was killed), the
    # report last; each kill at a random start of its phase and a random delay into it.
    cycle = ["extraction", "trials", "refit", "registration"]
    order = [cycle[i % len(cycle)] for i in range(max(1, a.kills - 1))] + ["report"]
    plan = [(phase, rng.randint(1, 3) if phase == "trials" else 1, rng.uniform(0, 1.0)) for phase in order]
    base = a.keep or Path(tempfile.mkdtemp(prefix="faults-"))
    name = __import__("yaml").safe_load(a.recipe.read_text())["study"]
    t0 = time.time()
    _, ref_s = study(a.recipe, base / "uninterrupted", base / "cache-a", None)
    killed, seconds = [], []
    for phase, n, delay in plan:
        hit, s = study(a.recipe, base / "killed", base / "cache-b", (phase, n, delay))
        killed.append({"phase": phase, "nth": n, "delay_s": round(delay, 2), "killed": hit})
        seconds.append(s)
    _, s = study(a.recipe, base / "killed", base / "cache-b", None)  # the last resume runs to the end
    seconds.append(s)
    result = {
        **compare(end_state(base / "uninterrupted", name), end_state(base / "killed", name)),
        "kills_planned": len(plan),
        "kills_survived": sum(k["killed"] for k in killed),
        "kills": killed,
        "uninterrupted_s": ref_s,
        "interrupted_total_s": sum(seconds),
        "wall_s": time.time() - t0,
    }
    print("\nFault benchmark:", a.recipe.name, f"seed {a.seed}")
    for k in killed:
        print(
            f"  kill during {k['phase']:<12} (start {k['nth']}, +{k['delay_s']} s): "
            f"{'killed and resumed' if k['killed'] else 'missed: the study ended first'}"
        )
    for k in ("kills_survived", "trials_lost", "trials_duplicated", "trials_differing", "running_left"):
        print(f"  {k.replace('_', ' '):<20} {result[k]}")
    print(f"  uninterrupted {ref_s:.0f} s, interrupted runs {sum(seconds):.0f} s in all")
    for p in result["problems"]:
        print(f"  problem: {p}")
    print(json.dumps(result))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        sys.exit("fault benchmark stopped; the study it was running was stopped with it")
