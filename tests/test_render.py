"""Report rendering: Markdown and HTML from the same blocks; text from folders and recipes is escaped in HTML."""

from pathlib import Path

import numpy as np
from PIL import Image

from harness.report.render import details, h, img, p, table, to_html, to_markdown


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


def test_details_fold_in_html_and_are_a_heading_in_markdown(tmp_path):
    png = tmp_path / "fig.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    inner = [p("inside <b>"), table(["a"], [["x"], ["y"]], "t", marked=(1,)), img(png, "cap", "fig-1")]
    blocks = [p("answer", "answer"), details("Model <m>", inner, level=3), details("Open", [p("z")], 2, open_=True)]
    html = to_html(blocks, "t")
    assert "<details class='l3'><summary>Model &lt;m&gt;</summary>" in html and "<p>inside &lt;b&gt;</p>" in html
    assert html.index("<details class='l3'>") < html.index("inside") < html.index("</details>")
    assert "<details class='l2' open><summary>Open</summary>" in html
    assert "<p class='answer'>answer</p>" in html and "<tr class='mark'><td>y</td></tr>" in html
    assert "<figure id='fig-1'>" in html
    md = to_markdown(blocks, tmp_path)
    assert "### Model <m>\n\ninside <b>" in md and "## Open\n\nz" in md and "| y |" in md


def test_long_words_break_anywhere_so_tables_fit_the_page():
    """A table shrinks to the page: cells wrap between words, and a cell with a word too long for a column (a path,
    a URI) breaks it anywhere; ordinary words are never split."""
    from harness.report.render import CSS

    html = to_html([table(["a", "b"], [["task1-efficientnet_lite0", "/a/very/long/path/to/some/image-0001.png"]])], "t")
    assert "<td>task1-efficientnet_lite0</td><td class='brk'>/a/very/long/path" in html
    assert "td.brk{overflow-wrap:anywhere}" in CSS and "max-width:100%" in CSS.split("table{", 1)[1].split("}")[0]


def test_cpu_vs_gpu_table_from_runs_of_the_same_model():
    """The report pairs runs of one model on a CPU and on a GPU (newest of each) and states the speed-up."""
    from types import SimpleNamespace as NS

    from harness.report.collect import Study
    from harness.report.provenance import timing_blocks as _timing

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
