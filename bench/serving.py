"""What serving the demo champion costs as Keras and as its ONNX export: per-call latency at batch 1 and 32 (median,
p95) of Keras, ONNX Runtime and its dynamic INT8 version on random images, parity with Keras and INT8 label agreement
on random and on the demo's images, then `mlflow models serve` of the ONNX pyfunc (and of the Keras champion)
under 4 concurrent loopback clients for a bounded time: requests/s, images/s, request latency and the peak RSS of the
server's process tree. The last line is one JSON object.

Everything lives in a folder of its own (default `.harness-bench-serving`, which ignores itself in git): its
HARNESS_HOME with the demo study's Task 2 models, tuned once (minutes) and reused afterwards, its cache, the
exports and the servers' logs. Weights fetches go to a closed loopback port: nothing leaves the machine.

    python bench/serving.py                         # the demo champion: ~2 minutes once the demo store exists
    python bench/serving.py --seconds 10 --servers onnx --threads 1
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import harness  # noqa: F401  (thread settings before TensorFlow)

ROOT = Path(__file__).resolve().parents[1]
MODEL_URI = "models:/demo-task2@champion"


def use_folder(folder: Path) -> dict:
    """Point this process (and the processes it starts) at the bench's own store, before MLflow is imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / ".gitignore").write_text("*\n")  # the folder ignores itself: no stray store in `git status`
    home = folder / "home"
    env = {
        "HARNESS_HOME": str(home),
        "HARNESS_CACHE": str(folder / "cache"),
        "HARNESS_WEIGHTS_MIRROR": "http://127.0.0.1:9/",  # VGG19 and DenseNet121 (optional) are skipped, offline
        "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}",
    }
    os.environ.update(env)
    return env


def has_champion() -> bool:
    import mlflow

    try:
        mlflow.MlflowClient().get_model_version_by_alias("demo-task2", "champion")
        return True
    except mlflow.exceptions.MlflowException:
        return False


# The demo recipe's Task 2 models (and their ensemble): the champion of `demo-task2` in a few minutes, where the
# whole demo (Task 1 too) takes about six.
DEMO_TASK2 = [
    "--only",
    "task2-efficientnet_lite0",
    "--only",
    "task2-efficientnet_lite1",
    "--only",
    "task2-efficientnet_lite2",
]


def ensure_demo(folder: Path) -> float | None:
    """Tune the demo recipe's Task 2 models into the bench's store unless its Task 2 champion exists; its seconds,
    None if reused."""
    if has_champion():
        return None
    print(f"No demo store in {folder}: tuning the demo's Task 2 (minutes; its output goes to {folder / 'demo.log'})")
    t0 = time.perf_counter()
    recipe = ROOT / "recipes" / "demo.yaml"
    with open(folder / "demo.log", "w") as out:
        rc = subprocess.run(
            [sys.executable, "-m", "harness.cli", "tune", str(recipe), *DEMO_TASK2],
            stdout=out,
            stderr=subprocess.STDOUT,
        ).returncode
    if rc != 0 or not has_champion():
        tail = (folder / "demo.log").read_text()[-3000:]
        raise SystemExit(f"`harness tune` of the demo failed (exit {rc}) in {folder}:\n{tail}")
    return time.perf_counter() - t0


def champion(folder: Path) -> dict:
    """The champion's Keras model, its file and its config, from the logged model's own MLmodel file."""
    import keras
    import mlflow
    import yaml

    local = Path(mlflow.artifacts.download_artifacts(MODEL_URI, dst_path=str(folder / "champion")))
    pyfunc = yaml.safe_load((local / "MLmodel").read_text())["flavors"]["python_function"]
    keras_path = local / pyfunc["artifacts"]["keras_model"]["path"]
    model = keras.saving.load_model(keras_path, compile=False, safe_mode=True)
    return {"model": model, "keras_path": keras_path, "config": pyfunc["config"]}


def demo_images(size: int, limit: int = 96):
    """The demo's images (raw 0-255 RGB at the model's size, as a client sends them)."""
    import numpy as np
    from PIL import Image

    files = sorted((Path(os.environ["HARNESS_HOME"]) / "data" / "demo").rglob("*.png"))[:limit]
    return np.stack([np.asarray(Image.open(f).convert("RGB").resize((size, size)), dtype="float32") for f in files])


def agreement(model, onnx_path: Path, int8_path: Path, images) -> dict:
    """Parity and label agreement with Keras on the demo's images (random images say little about labels)."""
    import numpy as np

    from harness.serving import onnx as ox

    reference = ox.keras_call(model, images.shape[1])(images)
    out = {}
    for name, path in (("onnx", onnx_path), ("int8", int8_path)):
        p = ox.run(ox.session(path), images)
        out[f"{name}_parity_demo_images"] = float(np.max(np.abs(p - reference)))
        out[f"{name}_label_agreement_demo_images"] = float(np.mean(ox.labels(p) == ox.labels(reference)))
    return out


def log_onnx_pyfunc(onnx_path: Path, config: dict, metrics: dict) -> str:
    """The export as an MLflow pyfunc (harness/serving/serving_model.py) in a `bench-serving` run, with the figures."""
    import importlib.metadata

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema, TensorSpec

    size, classes = config["image_size"], config["classes"]
    signature = ModelSignature(  # as the Keras model's: raw (N, S, S, 3) float32 images in, one column per class
        inputs=Schema([TensorSpec(np.dtype("float32"), (-1, size, size, 3))]),
        outputs=Schema([ColSpec("double", c) for c in classes]),
    )
    pins = [f"{d}=={importlib.metadata.version(d)}" for d in ("mlflow", "onnxruntime")]
    mlflow.set_experiment("bench-serving")
    with mlflow.start_run(run_name=f"onnx {config.get('model_key', 'champion')}"):
        mlflow.log_metrics(metrics)
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(ROOT / "harness" / "serving" / "serving_model.py"),
            artifacts={"onnx_model": str(onnx_path)},
            model_config=config,
            signature=signature,
            pip_requirements=[*pins, "numpy", "pandas"],
        ).model_uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_by_process_mib(proc) -> dict[str, float]:
    """Resident memory of a process and each of its descendants (the `mlflow models serve` CLI execs bash, which
    execs uvicorn, whose worker loads the model), keyed by pid and program name."""
    import psutil

    out = {}
    with contextlib.suppress(psutil.Error):
        for p in [proc, *proc.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                cmd = p.cmdline()
                name = " ".join(Path(c).name for c in cmd[1:3]) if cmd and "python" in Path(cmd[0]).name else p.name()
                out[f"{p.pid} {name[:40]}"] = p.memory_info().rss / 2**20
    return out


def tree_rss_mib(proc) -> float:
    return sum(rss_by_process_mib(proc).values())


class Server:
    """`mlflow models serve` of one model on a free loopback port, in its own session (stopped as a group), with
    the peak RSS of its process tree sampled every 0.2 s from start to stop."""

    def __init__(self, model_uri: str, log_file: Path):
        import psutil

        self.port, self.log_file, self.peak_mib = free_port(), log_file, 0.0
        bin_dir = Path(sys.executable).parent  # the server execs `uvicorn`, found on PATH: this environment's
        args = [str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local"]
        with open(log_file, "w") as log:
            self.proc = subprocess.Popen(
                [*args, "-h", "127.0.0.1", "-p", str(self.port)],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"},
            )
        self.ps, self.stopped = psutil.Process(self.proc.pid), threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self):
        while not self.stopped.wait(0.2):
            self.peak_mib = max(self.peak_mib, tree_rss_mib(self.ps))

    def wait_ready(self, seconds: float) -> float:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            if self.proc.poll() is not None:
                raise SystemExit(
                    f"the model server exited ({self.proc.returncode}):\n{self.log_file.read_text()[-3000:]}"
                )
            with contextlib.suppress(OSError):  # loopback only: the server this bench started
                if urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ping", timeout=2).status == 200:
                    return time.perf_counter() - t0
            time.sleep(0.5)
        raise SystemExit(f"the model server did not answer /ping in {seconds:.0f} s: see {self.log_file}")

    def stop(self):
        self.stopped.set()
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def post(port: int, body: bytes) -> None:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        r.read()


def load(port: int, bodies: list[bytes], clients: int, seconds: float) -> dict:
    """`clients` threads posting `bodies` in turn for `seconds`: completed requests and their latencies."""
    import numpy as np

    deadline = time.perf_counter() + seconds
    latencies, errors, lock = [], [], threading.Lock()

    def client(k: int):
        i = k
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            try:
                post(port, bodies[i % len(bodies)])
                with lock:
                    latencies.append(time.perf_counter() - t0)
            except OSError as e:
                with lock:
                    errors.append(repr(e))
            i += clients

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0  # to the end of the last request, which may run past the deadline
    ms = 1000 * np.asarray(latencies or [np.nan])
    return {
        "requests": len(latencies),
        "errors": len(errors),
        "requests_per_s": len(latencies) / wall,
        "request_median_ms": float(np.median(ms)),
        "request_p95_ms": float(np.percentile(ms, 95)),
    }


def serve_and_load(model_uri: str, name: str, images, a, folder: Path) -> dict:
    """Start a server for `model_uri`, load it with each request size in turn, stop it (always)."""
    server = Server(model_uri, folder / f"serve-{name}.log")
    try:
        out = {"startup_s": server.wait_ready(300)}
        for n in a.request_images:
            starts = range(0, len(images) - n + 1, n)  # whole requests of n images each
            bodies = [json.dumps({"inputs": images[i : i + n].tolist()}).encode() for i in starts]
            post(server.port, bodies[0])  # the first request loads lazily-built state; not timed
            res = load(server.port, bodies, a.clients, a.seconds)
            out[f"{n}_per_request"] = {**res, "images_per_s": res["requests_per_s"] * n}
        out["peak_rss_mib"] = max(server.peak_mib, tree_rss_mib(server.ps))
        out["end_rss_mib_by_process"] = rss_by_process_mib(server.ps)
        return out
    finally:
        server.stop()


def print_figures(cost: dict, extra: dict, served: dict) -> None:
    print("\nPer call on random images (median / p95 ms; per image at batch 32)")
    for name in ("keras", "onnx", "int8"):
        b1, b32 = (f"cost.{name}.b{b}" for b in (1, 32))
        print(
            f"  {name:<5}  b1 {cost[b1 + '.median_ms']:7.1f} / {cost[b1 + '.p95_ms']:7.1f}"
            f"   b32 {cost[b32 + '.median_ms']:7.1f} / {cost[b32 + '.p95_ms']:7.1f}"
            f"   {cost[b32 + '.per_image_ms']:5.2f} ms/image   {cost[f'cost.{name}_file_mb']:5.1f} MB"
        )
    print(f"  ONNX / Keras batch-1 median: {cost['cost.onnx_vs_keras_latency_ratio']:.2f}")
    print(
        f"Parity with Keras: ONNX {cost['cost.onnx.parity']:.1e} random, {extra['onnx_parity_demo_images']:.1e} demo;"
        f" INT8 {cost['cost.int8.parity']:.3f} random, {extra['int8_parity_demo_images']:.3f} demo, labels agree on"
        f" {extra['int8_label_agreement_demo_images']:.0%} of demo images"
    )
    for name, s in served.items():
        print(f"`mlflow models serve` {name}: ready in {s['startup_s']:.1f} s, peak RSS {s['peak_rss_mib']:.0f} MiB")
        for k, r in s.items():
            if k.endswith("_per_request"):
                print(
                    f"  {k.replace('_', ' ')}: {r['requests_per_s']:.1f} requests/s, {r['images_per_s']:.1f} images/s,"
                    f" median {r['request_median_ms']:.0f} ms, p95 {r['request_p95_ms']:.0f} ms, {r['errors']} errors"
                )


def main(a) -> dict:
    t_start = time.perf_counter()
    folder = a.out.resolve()
    use_folder(folder)
    demo_s = ensure_demo(folder)
    from harness.serving import onnx as ox

    stage_s, t = {}, time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        stage_s[name], t = time.perf_counter() - t, time.perf_counter()

    champ = champion(folder)
    model, config = champ["model"], champ["config"]
    size = int(config["image_size"])
    lap("load_champion")
    onnx_path = ox.export(model, size, folder / "export" / "model.onnx")
    lap("export")
    int8_path = ox.quantize_int8(onnx_path, folder / "export" / "model.int8.onnx")
    lap("quantize")
    cost = ox.serving_cost(
        model,
        onnx_path,
        size,
        keras_path=champ["keras_path"],
        int8_path=int8_path,
        repeats=a.repeats,
        threads=a.threads,
    )
    images = demo_images(size)
    extra = agreement(model, onnx_path, int8_path, images)
    lap("latency_and_parity")
    onnx_uri = log_onnx_pyfunc(onnx_path, config, cost)
    lap("log_pyfunc")
    uris = {"onnx": onnx_uri, "keras": MODEL_URI}
    served = {}
    for name in a.servers:
        served[name] = serve_and_load(uris[name], name, images, a, folder)
        lap(f"serve_{name}")
    print_figures(cost, extra, served)
    key = f"{a.request_images[0]}_per_request"
    return {
        "model": config.get("model_key"),
        "image_size": size,
        "onnx_vs_keras_latency_ratio": cost["cost.onnx_vs_keras_latency_ratio"],
        "parity": cost["cost.onnx.parity"],
        **extra,
        "cost": {k.removeprefix("cost."): v for k, v in cost.items()},
        "served": served,
        "onnx_requests_per_s": served["onnx"][key]["requests_per_s"] if "onnx" in served else None,
        "onnx_server_peak_rss_mib": served["onnx"]["peak_rss_mib"] if "onnx" in served else None,
        "clients": a.clients,
        "demo_s": demo_s,
        "stage_s": stage_s,
        "wall_s": time.perf_counter() - t_start,
        "load_average": os.getloadavg()[0],
        "cpus": os.cpu_count(),
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / ".harness-bench-serving", help="the bench's own folder")
    ap.add_argument("--repeats", type=int, default=20, help="timed calls per runtime and batch size")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default: its own)")
    ap.add_argument("--servers", default="onnx,keras", help="which models to serve: onnx, keras (comma-separated)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent loopback clients")
    ap.add_argument("--seconds", type=float, default=10, help="load time per request size")
    ap.add_argument("--request-images", default="1,16", help="images per request, one load phase each")
    a = ap.parse_args()
    a.servers = [s for s in a.servers.split(",") if s]
    a.request_images = [int(n) for n in a.request_images.split(",")]
    print(json.dumps(main(a)))
