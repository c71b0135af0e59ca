"""HTML pieces of the report: one self-contained page, figures embedded as data URIs.

Every text that comes from data (token text, ids, config values) goes through
`html.escape`; the page carries no script at all, and a Content-Security-Policy that
forbids scripts and any network fetch, so a trajectory holding `<script>` is shown as
text and nothing can run even if a value slipped through.
"""

from __future__ import annotations

import base64
import html
import json

CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
h1 { border-bottom: 2px solid #444; } h2 { margin-top: 2em; border-bottom: 1px solid #aaa; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.85em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.5em; text-align: right; vertical-align: top; }
th { background: #f0f0f0; } td.text { text-align: left; font-family: monospace; white-space: pre-wrap; }
td.left { text-align: left; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; }
mark { background: #ffd54f; font-weight: bold; }
details { margin: 0.5em 0; } code { font-size: 0.85em; }
"""


def esc(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return "-" if value != value else f"{value:.{digits}f}"
    return str(value)


def interval(value, ci, digits: int = 3) -> str:
    if value is None:
        return "-"
    if not ci or ci[0] is None:
        return fmt(value, digits)
    return f"{value:.{digits}f} [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def table(headers: list[str], rows: list[list], table_id: str | None = None, cell_attributes=None) -> str:
    """An HTML table; cells are escaped unless given as ("raw", html). `cell_attributes(r, c)`
    may return extra attributes (already safe: built from escaped values)."""
    opening = f'<table id="{esc(table_id)}">' if table_id else "<table>"
    out = [opening, "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in headers) + "</tr>"]
    for r, row in enumerate(rows):
        cells = []
        for c, value in enumerate(row):
            extra = cell_attributes(r, c) if cell_attributes else ""
            if isinstance(value, tuple) and value[0] == "raw":
                cells.append(f"<td{extra}>{value[1]}</td>")
            else:
                cells.append(f"<td{extra}>{esc(value)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def key_values(mapping: dict) -> str:
    rows = [[key, json.dumps(value, default=str) if isinstance(value, (dict, list)) else value]
            for key, value in mapping.items()]
    return table(["setting", "value"], rows, cell_attributes=lambda r, c: ' class="left"' if c else "")


def figure_html(figure, png: bytes) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure id="fig-{esc(figure.name)}"><img alt="{esc(figure.title)}" src="data:image/png;base64,{data}">'
            f"<figcaption><b>{esc(figure.title)}.</b> {esc(figure.caption)} "
            f"(files: figures/{esc(figure.name)}.png, .svg)</figcaption></figure>")


def document(title: str, body: str) -> str:
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<title>{esc(title)}</title>
<style>{STYLE}</style>
</head>
<body>
<h1>{esc(title)}</h1>
{body}
</body>
</html>
"""
