"""Report rendering: Markdown and HTML from the same blocks; text from folders and recipes is escaped in HTML."""
from pathlib import Path

import numpy as np
from PIL import Image

from harness.report.render import h, img, p, table, to_html, to_markdown


def test_names_are_escaped_and_images_embedded(tmp_path):
    png = tmp_path / "fig.png"
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(png)
    evil = "<script>alert('x')</script>"
    blocks = [h(f"Task {evil}"), p(f"class {evil}"), table(["model", "class"], [[evil, "a|b"]], "t"),
              img(png, f"caption {evil}")]
    html = to_html(blocks, f"study {evil}")
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "src='data:image/png;base64," in html
    md = to_markdown(blocks, tmp_path)
    assert "a\\|b" in md and "](fig.png)" in md


def test_empty_table_still_renders(tmp_path):
    assert "<table id='e'>" in to_html([table(["a"], [], "e")], "t")
    assert to_markdown([table(["a"], [], "e")], Path(tmp_path)).startswith("| a |")
