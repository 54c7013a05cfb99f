"""What every report regap writes shares: rendering markdown into one self-contained HTML page, and
the marker that tells a report regap wrote from one it did not (`regap report` never replaces those).

Both the demo's report (`regap.report.demo`) and the study's (`regap.study.study_report`) render here.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from regap.errors import RegapError
from regap.files import write_text_atomic


#: The first line of every report.md regap writes, and a comment in every report.html: a report
#: with it (or with one of the headers regap wrote before the marker existed) may be rewritten.
MARKER = "<!-- written by regap; `regap report` rewrites this file -->"
_KNOWN_HEADERS = ("# regap report: ", "# regap study `",
                  '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>regap report: ')
REPORT_FILES = ("report.md", "report.html")


def written_by_regap(path: Path) -> bool:
    """Whether the file at `path` is a report regap wrote (its marker, or a header regap wrote)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(4096).decode("utf-8", errors="replace")
    except OSError:
        return False
    return MARKER in head or head.startswith(_KNOWN_HEADERS)


def check_reports_overwritable(root: Path) -> None:
    """Refuse, before anything is written, to replace a report.md / report.html regap did not write."""
    for name in REPORT_FILES:
        path = root / name
        if (path.exists() or path.is_symlink()) and (not path.is_file() or not written_by_regap(path)):
            raise RegapError(f"{path} was not written by regap; move it away first (regap never replaces a "
                             "report it did not write)")


def write_reports(root: Path, markdown_text: str, title: str) -> None:
    """report.md (marked as regap's) and the self-contained report.html, each written atomically."""
    write_text_atomic(root / "report.md", f"{MARKER}\n{markdown_text}")
    write_text_atomic(root / "report.html", render_html(markdown_text, root, title))


def render_html(markdown_text: str, root: Path, title: str) -> str:
    """Render the markdown with markdown-it (tables on) and inline every image."""
    from markdown_it import MarkdownIt

    renderer = MarkdownIt("commonmark", {"html": False}).enable("table")  # run-file text never becomes markup
    body = renderer.render(markdown_text)
    for figure in sorted({p for p in root.rglob("*.png")}, key=lambda p: -len(str(p))):
        relative = str(figure.relative_to(root))
        if f'src="{relative}"' in body:
            data = base64.b64encode(figure.read_bytes()).decode("ascii")
            body = body.replace(f'src="{relative}"', f'src="data:image/png;base64,{data}"')
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:14px}"
             "img{max-width:100%}td img{max-width:500px}code{background:#f4f4f4}")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>regap report: {html.escape(title)}"
            f"</title><style>{style}</style></head><body>\n{MARKER}\n{body}</body></html>\n")
