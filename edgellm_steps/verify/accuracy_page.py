"""The accuracy report as a person reads it: a plot of quality against size (PNG) and a self-contained HTML page.

The plot puts one point per precision: the graph's bytes (what the engine holds) across, perplexity on the
held-out text up, and the top-1 agreement with the fp16 export in a second panel; a third draws each
precision's hidden-state error against fp16 layer by layer (where along the depth it departs). The page holds the table
and the plot inline, so it can be mailed or opened from a Snakemake report alone.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from edgellm_steps.verify.html_page import html_page

#: Columns of the page's table: (title, key in a precision's figures, format).
COLUMNS = (
    ("perplexity", "perplexity", "{:.4g}"),
    ("next-token accuracy", "next_token_accuracy", "{:.1%}"),
    ("top-1 agreement with fp16", "top1_agreement", "{:.1%}"),
    ("mean KL from fp16 (nats/token)", "mean_kl", "{:.3g}"),
    ("largest layer error vs fp16", "layer_relative_error", "{:.3g}"),
    ("engine estimate (MB)", "engine_bytes_estimate", "{:.1f}"),
    ("export on disk (MB)", "export_bytes", "{:.1f}"),
)
_MEGABYTE = 1e6


def plot_png(report: dict[str, Any]) -> bytes:
    """Quality against size, one point per precision, as PNG bytes (no timestamp: the same report, the same bytes)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figures = report["precisions"]
    names = list(figures)
    sizes = [figures[n]["engine_bytes_estimate"] / _MEGABYTE for n in names]
    fig, (left, right, depth) = plt.subplots(1, 3, figsize=(15, 4), dpi=100)
    for axis, key, label in (
        (left, "perplexity", "perplexity on held-out text (lower is better)"),
        (right, "top1_agreement", f"top-1 agreement with {report['baseline']}"),
    ):
        values = [figures[n][key] for n in names]
        axis.scatter(sizes, values)
        # Labels alternately above and below their points in order of size: neighbours stay legible.
        rank = {i: r for r, i in enumerate(sorted(range(len(names)), key=sizes.__getitem__))}
        for index, (name, x, y) in enumerate(zip(names, sizes, values, strict=True)):
            below = rank[index] % 2 == 0
            axis.annotate(name, (x, y), textcoords="offset points", xytext=(4, -11 if below else 4), fontsize=8)
        axis.set_xlabel("engine size estimate (MB)")
        axis.set_ylabel(label)
        axis.grid(True, alpha=0.3)
    for name in names:
        errors = figures[name].get("layer_relative_error") or []
        if name != report["baseline"] and errors:
            depth.plot(range(len(errors)), errors, marker="o", label=name)
    depth.set_xlabel("decoder layer")
    depth.xaxis.set_major_locator(MaxNLocator(integer=True))
    depth.set_ylabel(f"hidden-state error vs {report['baseline']} (relative)")
    if depth.lines:
        depth.set_yscale("log")
        depth.legend(fontsize=8)
    depth.grid(True, alpha=0.3)
    fig.suptitle(f"{report['model']}: {report['inputs']['scored_tokens']} held-out tokens")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()


def page_html(report: dict[str, Any], png: bytes) -> bytes:
    """The HTML page: what was measured, the table, the plot inline."""
    inputs = report["inputs"]
    head = "".join(f"<th>{html.escape(title)}</th>" for title, _, _ in COLUMNS)
    rows = []
    for name, figures in report["precisions"].items():
        cells = []
        for _, key, fmt in COLUMNS:
            value = figures[key] / _MEGABYTE if "bytes" in key else figures[key]
            if isinstance(value, list):  # per layer: the largest, and where
                value, where = (max(value), f" (layer {value.index(max(value))})") if value else (None, "")
                cells.append("<td>-</td>" if value is None else f"<td>{fmt.format(value)}{where}</td>")
                continue
            cells.append(f"<td>{fmt.format(value)}</td>")
        rows.append(f"<tr><th>{html.escape(name)}</th>{''.join(cells)}</tr>")
    image = base64.b64encode(png).decode()
    body = f"""<p>Each precision's exported graph, run on {inputs["samples"]} windows of {inputs["tokens"]} tokens of
{html.escape(str(inputs["dataset"]))} ({html.escape(inputs["split"])} text, never used in calibration):
{inputs["scored_tokens"]} next tokens scored. Agreement and KL are against the {html.escape(report["baseline"])}
export on the same tokens.</p>
<table><tr><th>precision</th>{head}</tr>
{chr(10).join(rows)}
</table>
<p><img alt="quality against size" src="data:image/png;base64,{image}"></p>"""
    title = f"Accuracy of {report['model']}"
    return html_page(title, title, body)
