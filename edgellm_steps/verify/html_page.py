"""The self-contained HTML page every report page is: one style, no external files, so it opens from a mail or a
Snakemake report alone."""

from __future__ import annotations

import html

_STYLE = (
    "body{font-family:sans-serif;margin:2em}td,th{padding:.3em .8em;text-align:right}\n"
    "table{border-collapse:collapse}tr:nth-child(even){background:#f2f2f2}"
)


def html_page(title: str, heading: str, body: str) -> bytes:
    """A page titled ``title`` (escaped here) under the heading ``heading`` (escaped), with ``body`` (HTML) below."""
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{_STYLE}</style></head>
<body><h1>{html.escape(heading)}</h1>
{body}
</body></html>
""".encode()
