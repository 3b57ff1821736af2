"""Rendering one list of report blocks to Markdown (PNGs beside it) and to self-contained HTML (images embedded).
Every piece of text that came from folders, recipes or MLflow is escaped in HTML.

Blocks: `h` heading, `p` paragraph (an optional class: `answer` for a task's answer sentence, `note`), `table` (rows
optionally marked: the champion's), `img` (a PNG, embedded in HTML), `details` (a folded group of blocks: a
`<details>` element in HTML, a heading and its content in Markdown). The page is laid out for 1280 px: no table is
wider than the page (cells wrap between words, a cell with a
word too long for a column anywhere), and folded groups keep it short."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1180px;margin:1.2em auto;padding:0 1em;color:#222;
line-height:1.35}
h1{font-size:1.6em;margin:.3em 0}h2{font-size:1.3em;margin:.9em 0 .4em}h3{font-size:1.1em;margin:.8em 0 .3em}
table{border-collapse:collapse;margin:.6em 0;font-size:.88em;max-width:100%;table-layout:auto}
td,th{border:1px solid #ccc;padding:.25em .5em;text-align:left;vertical-align:top;overflow-wrap:break-word}
th{background:#f3f3f3}td.brk{overflow-wrap:anywhere}table[id^=summary-] td:first-child{white-space:nowrap}
tr.mark td{background:#fff4cc}tr.mark td:first-child{font-weight:600}
.wide{max-width:100%;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:.3em 0}.note{color:#555;font-size:.92em}
p.answer{font-size:1.05em;background:#f5f8ff;border-left:4px solid #3569c9;padding:.4em .7em;margin:.4em 0}
figure{margin:.5em 0}figcaption{font-size:.85em;color:#555}
details{border:1px solid #ddd;border-radius:4px;padding:.2em .7em;margin:.4em 0}
details>summary{cursor:pointer;font-weight:600;padding:.2em 0}
details.l2>summary{font-size:1.15em}details[open]>summary{border-bottom:1px solid #eee;margin-bottom:.4em}"""


def h(text: str, level: int = 2):
    return ("h", level, text)


def p(text: str, cls: str = ""):
    """A paragraph; `cls` "answer" marks a task's answer sentence, "note" a side remark."""
    return ("p", text, cls)


def table(headers: list[str], rows: list[list], table_id: str = "", marked: tuple[int, ...] = ()):
    """A table; the rows at the indices `marked` are highlighted (the champion's)."""
    return ("table", headers, rows, table_id, tuple(marked))


def img(path: Path, caption: str, fig_id: str = ""):
    return ("img", path, caption, fig_id)


def details(summary: str, blocks: list, level: int = 3, open_: bool = False):
    """A folded group: `<details><summary>` in HTML (open when `open_`), a heading of `level` and the blocks in
    Markdown."""
    return ("details", summary, list(blocks), level, open_)


def to_markdown(blocks: list, out_dir: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        lines += _markdown(b, out_dir)
    return "\n".join(lines)


def _markdown(b: tuple, out_dir: Path) -> list[str]:
    kind = b[0]
    if kind == "h":
        return ["#" * b[1] + " " + b[2], ""]
    if kind == "p":
        return [b[1], ""]
    if kind == "table":
        headers, rows = b[1], b[2]  # a marked row reads as any other (its table says why it is marked)
        out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
        out += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
        return [*out, ""]
    if kind == "img":
        return [f"![{b[2]}]({Path(b[1]).relative_to(out_dir).as_posix()})", "", f"*{b[2]}*", ""]
    if kind == "details":
        _, summary, inner, level, _ = b
        return ["#" * level + " " + summary, ""] + [ln for x in inner for ln in _markdown(x, out_dir)]
    raise ValueError(f"unknown report block {kind!r}")


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
        f"<title>{e(title)}</title><style>{CSS}</style></head><body>"
    ]
    for b in blocks:
        parts += _html(b)
    parts.append("</body></html>")
    return "\n".join(parts)


LONG_TOKEN = 24  # a cell holding a longer unbroken word (a path, a URI, a list joined by commas) breaks it anywhere


def _td(text: str) -> str:
    """A cell; one with a word too long to fit a column breaks it anywhere, the others wrap between words only, so
    a table fits the page without breaking ordinary words."""
    brk = any(len(word) > LONG_TOKEN for word in text.split())
    return f"<td class='brk'>{html.escape(text)}</td>" if brk else f"<td>{html.escape(text)}</td>"


def _html(b: tuple) -> list[str]:
    e = html.escape
    kind = b[0]
    if kind == "h":
        return [f"<h{b[1]}>{e(b[2])}</h{b[1]}>"]
    if kind == "p":
        cls = b[2] if len(b) > 2 else ""
        return [f"<p class='{e(cls)}'>{e(b[1])}</p>" if cls else f"<p>{e(b[1])}</p>"]
    if kind == "table":
        headers, rows, tid = b[1], b[2], b[3]
        marked = b[4] if len(b) > 4 else ()
        out = [f"<div class='wide'><table id='{e(tid)}'><tr>" + "".join(f"<th>{e(str(x))}</th>" for x in headers)]
        out[0] += "</tr>"
        out += [
            ("<tr class='mark'>" if i in marked else "<tr>") + "".join(_td(str(c)) for c in r) + "</tr>"
            for i, r in enumerate(rows)
        ]
        return [*out, "</table></div>"]
    if kind == "img":
        data = base64.b64encode(Path(b[1]).read_bytes()).decode()
        fid = b[3] if len(b) > 3 else ""
        return [
            (f"<figure id='{e(fid)}'>" if fid else "<figure>")
            + f"<img alt='{e(b[2])}' src='data:image/png;base64,{data}'><figcaption>{e(b[2])}</figcaption></figure>"
        ]
    if kind == "details":
        _, summary, inner, level, open_ = b
        head = f"<details class='l{level}'{' open' if open_ else ''}><summary>{e(summary)}</summary>"
        return [head] + [ln for x in inner for ln in _html(x)] + ["</details>"]
    raise ValueError(f"unknown report block {kind!r}")
