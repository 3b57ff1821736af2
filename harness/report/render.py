"""Rendering one list of report blocks to Markdown (PNGs beside it) and to self-contained HTML (images embedded).
Every piece of text that came from folders, recipes or MLflow is escaped in HTML."""

from __future__ import annotations

import base64
import html
from pathlib import Path

CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
td,th{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f3f3f3}img{max-width:100%;border:1px solid #eee;margin:.4em 0}.note{color:#555}
figure{margin:1em 0}figcaption{font-size:.85em;color:#555}"""


def h(text: str, level: int = 2):
    return ("h", level, text)


def p(text: str):
    return ("p", text)


def table(headers: list[str], rows: list[list], table_id: str = ""):
    return ("table", headers, rows, table_id)


def img(path: Path, caption: str):
    return ("img", path, caption)


def to_markdown(blocks: list, out_dir: Path) -> str:
    lines = []
    for b in blocks:
        if b[0] == "h":
            lines += ["#" * b[1] + " " + b[2], ""]
        elif b[0] == "p":
            lines += [b[1], ""]
        elif b[0] == "table":
            _, headers, rows, _ = b
            lines.append("| " + " | ".join(headers) + " |")
            lines.append("|" + "---|" * len(headers))
            lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in r) + " |" for r in rows]
            lines.append("")
        elif b[0] == "img":
            lines += [f"![{b[2]}]({b[1].relative_to(out_dir).as_posix()})", "", f"*{b[2]}*", ""]
    return "\n".join(lines)


def to_html(blocks: list, title: str) -> str:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>{CSS}</style></head><body>"
    ]
    for b in blocks:
        if b[0] == "h":
            parts.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif b[0] == "p":
            parts.append(f"<p>{e(b[1])}</p>")
        elif b[0] == "table":
            _, headers, rows, tid = b
            parts.append(
                f"<div style='overflow-x:auto'><table id='{e(tid)}'><tr>"
                + "".join(f"<th>{e(str(x))}</th>" for x in headers)
                + "</tr>"
            )
            parts += ["<tr>" + "".join(f"<td>{e(str(c))}</td>" for c in r) + "</tr>" for r in rows]
            parts.append("</table></div>")
        elif b[0] == "img":
            data = base64.b64encode(Path(b[1]).read_bytes()).decode()
            parts.append(
                f"<figure><img alt='{e(b[2])}' src='data:image/png;base64,{data}'>"
                f"<figcaption>{e(b[2])}</figcaption></figure>"
            )
    parts.append("</body></html>")
    return "\n".join(parts)
