"""A tiny document model (sections of text, tables and figures) rendered to Markdown and to HTML.

The HTML is self-contained: figures are inlined as base64 PNGs, so the one file can be mailed or
attached; the Markdown links the same PNGs in ``figures/`` next to it.
"""

from __future__ import annotations

import base64
import html
import math
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Text:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]
    caption: str | None = None


@dataclass
class Figure:
    path: Path  # the PNG on disk, inside the output folder
    caption: str


@dataclass
class Section:
    title: str
    blocks: list[Text | Table | Figure] = field(default_factory=list)
    level: int = 2


@dataclass
class Document:
    title: str
    sections: list[Section] = field(default_factory=list)


def fmt(value, digits: int = 4) -> str:
    """Numbers for tables: integers with thousands separators, floats with ``digits`` decimals."""
    if value is None:
        return "–"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value.is_integer() and abs(value) >= 1000:
            return f"{int(value):,}"
        if value != 0 and (abs(value) < 10 ** (-digits) or abs(value) >= 1e7):
            return f"{value:.{digits - 1}e}"
        return f"{value:.{digits}f}"
    return str(value)


# ------------------------------------------------------------------------------------------ markdown
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(doc: Document, root: Path) -> str:
    lines = [f"# {doc.title}", ""]
    for section in doc.sections:
        lines += ["#" * section.level + " " + section.title, ""]
        for block in section.blocks:
            if isinstance(block, Text):
                lines += [block.text, ""]
            elif isinstance(block, Table):
                if block.caption:
                    lines += [f"*{block.caption}*", ""]
                lines.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                lines.append("|" + "|".join("---" for _ in block.headers) + "|")
                lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                lines.append("")
            else:
                rel = block.path.relative_to(root).as_posix()
                lines += [f"![{block.caption}]({rel})", "", f"*{block.caption}*", ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- html
STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1200px;
       margin: 2em auto; padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #eee; padding-bottom: .2em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0 1.2em; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: .3em .7em; text-align: right; }
th { background: #f4f4f4; }
td:first-child, th:first-child { text-align: left; }
figure { margin: 1em 0 2em; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption, .caption { color: #555; font-size: 0.92em; font-style: italic; }
"""


def _html_block(block: Text | Table | Figure) -> str:
    if isinstance(block, Text):
        return f"<p>{html.escape(block.text)}</p>"
    if isinstance(block, Table):
        head = "".join(f"<th>{html.escape(str(h))}</th>" for h in block.headers)
        body = "".join(
            "<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in block.rows
        )
        caption = f'<p class="caption">{html.escape(block.caption)}</p>' if block.caption else ""
        return f"{caption}<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    data = base64.b64encode(block.path.read_bytes()).decode("ascii")
    alt = html.escape(block.caption, quote=True)
    return (
        f'<figure><img alt="{alt}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(block.caption)}</figcaption></figure>"
    )


def to_html(doc: Document) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(doc.title)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(doc.title)}</h1>",
    ]
    for section in doc.sections:
        level = section.level
        parts.append(f"<h{level}>{html.escape(section.title)}</h{level}>")
        parts += [_html_block(block) for block in section.blocks]
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
