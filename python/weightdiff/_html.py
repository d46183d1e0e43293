"""The notebook view of a Comparison: a summary table, then the command line's
``report.html`` (heatmap of relative diff by layer × module type, spectra, top-modified
table) in an iframe, where its styles cannot leak into the notebook's."""

import html
from typing import Any


def comparison_html(c: Any) -> str:
    doc = c.document
    v = c.verdict or {}
    rows = [
        ("base", doc["base"]),
        ("fine-tuned", doc["finetuned"]),
        ("tensors compared", len(doc["all_differences"])),
        ("modified", len(doc["modified_layers"])),
        ("errors", len(doc["errors"])),
        ("verdict", v.get("kind")),
        ("rank", v.get("rank")),
        ("target modules", ", ".join(v.get("target_modules") or [])),
        ("confidence", v.get("confidence")),
        ("complete", doc["complete"]),
    ]
    table = "".join(
        f"<tr><th style='text-align:left'>{html.escape(str(k))}</th>"
        f"<td style='text-align:left'>{html.escape(str(val))}</td></tr>"
        for k, val in rows
    )
    page = html.escape(c.html(), quote=True)
    return (
        f"<div><table>{table}</table>"
        f"<iframe srcdoc=\"{page}\" style='width:100%;height:640px;border:1px solid #ccc'"
        f" sandbox='allow-scripts'></iframe></div>"
    )
