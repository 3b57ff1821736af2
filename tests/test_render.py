"""Report rendering: Markdown and HTML from the same blocks; text from folders and recipes is escaped in HTML."""

from pathlib import Path

import numpy as np
from PIL import Image

from harness.report.render import h, img, p, table, to_html, to_markdown


def test_names_are_escaped_and_images_embedded(tmp_path):
    png = tmp_path / "fig.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    evil = "<script>alert('x')</script>"
    blocks = [
        h(f"Task {evil}"),
        p(f"class {evil}"),
        table(["model", "class"], [[evil, "a|b"]], "t"),
        img(png, f"caption {evil}"),
    ]
    html = to_html(blocks, f"study {evil}")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "src='data:image/png;base64," in html
    md = to_markdown(blocks, tmp_path)
    assert "a\\|b" in md and "](fig.png)" in md


def test_empty_table_still_renders(tmp_path):
    assert "<table id='e'>" in to_html([table(["a"], [], "e")], "t")
    assert to_markdown([table(["a"], [], "e")], Path(tmp_path)).startswith("| a |")


def test_cpu_vs_gpu_table_from_runs_of_the_same_model():
    """The report pairs runs of one model on a CPU and on a GPU (newest of each) and states the speed-up."""
    from types import SimpleNamespace as NS

    from harness.report import _timing
    from harness.report.collect import Study

    def run(key, device, spe):
        return NS(data=NS(metrics={"seconds_per_epoch": spe}, tags={"model_key": key, "device": device}))

    runs = [
        run("task2-vgg19", "GPU", 0.5),
        run("task2-vgg19", "CPU", 20.0),
        run("task2-vgg19", "CPU", 99.0),
        run("task1-vgg19", "CPU", 10.0),
    ]
    blocks = _timing([], Study("s", "1", [], [], runs))
    side = next(b for b in blocks if b[0] == "table" and b[3] == "cpu-gpu")
    assert side[2] == [["task2-vgg19", "20.000", "0.500", "40.0x"]]  # task1 has no GPU run: not paired
    only_cpu = _timing([], Study("s", "1", [], [], runs[-1:]))
    assert not any(b[0] == "table" and b[3] == "cpu-gpu" for b in only_cpu)
