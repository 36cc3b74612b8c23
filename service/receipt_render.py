"""Receipts for people: Markdown and HTML renderings of the signed JSON receipt.

The JSON is the record (it carries the signature); these renderings are what a
data-protection officer reads or prints. Both show every section of the receipt.
"""

from __future__ import annotations

import html
import json
from typing import Any


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    if isinstance(value, (dict, list)):
        return json.dumps(value, sort_keys=True)
    return str(value)


def sections(receipt: dict[str, Any]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for each part of the receipt, in reading order."""
    ticket_rows = [[k, _fmt(receipt.get(k))] for k in (
        "ticket_id", "kind", "status", "requester", "lineage", "target", "engine",
        "forget_set_sha256", "requested_at", "completed_at")]
    version_rows = [[k, _fmt(receipt.get(k))] for k in (
        "version", "version_id", "parent_id", "version_status", "promoted", "job_id",
        "base_model")]
    artifacts = [[_fmt(a.get("name")), _fmt(a.get("object_key")), _fmt(a.get("sha256"))]
                 for a in receipt.get("artifacts") or []]
    evaluation = receipt.get("evaluation") or {}
    checks = [[_fmt(c.get("name")), _fmt(c.get("before")), _fmt(c.get("after")),
               _fmt(c.get("value")), f"{c.get('op', '')} {_fmt(c.get('threshold'))}",
               "PASS" if c.get("passed") else "FAIL" if c.get("passed") is False else "-"]
              for c in evaluation.get("checks") or []]
    phases = receipt.get("phases") or {}
    phase_rows = [[k, _fmt(v)] for k, v in phases.items() if k not in ("events", "job_phases")]
    phase_rows += [[e.get("action", ""), _fmt(e.get("at"))] for e in phases.get("events") or []]
    method = receipt.get("method_config")
    signature = receipt.get("signature") or {}
    out = [
        ("Ticket", ["field", "value"], ticket_rows),
        ("Version", ["field", "value"], version_rows),
        ("Artifacts", ["artifact", "object key", "sha256"], artifacts),
        (f"Evaluation (verdict: {_fmt(evaluation.get('verdict'))})",
         ["check", "before", "after", "value", "threshold", "result"], checks),
        ("Phases", ["phase", "at (UTC)"], phase_rows),
        ("Method configuration", ["config"], [[_fmt(method)]]),
        ("Exactness proof", ["proof"], [[_fmt(receipt.get("exactness_proof"))]]),
        ("Signature", ["algorithm", "key id", "value"],
         [[_fmt(signature.get("algorithm")), _fmt(signature.get("key_id")),
           _fmt(signature.get("value"))]]),
    ]
    return out


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(receipt: dict[str, Any]) -> str:
    lines = [f"# Deletion receipt: ticket {receipt.get('ticket_id')}", ""]
    for title, header, rows in sections(receipt):
        lines += [f"## {title}", ""]
        if not rows:
            lines += ["(none)", ""]
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
        lines.append("")
    lines.append("Verify the JSON form of this receipt with `oblivio receipt verify FILE`.")
    return "\n".join(lines) + "\n"


def to_html(receipt: dict[str, Any]) -> str:
    esc = html.escape
    parts = ["<!doctype html>", "<html><head><meta charset=\"utf-8\">",
             f"<title>Deletion receipt {esc(str(receipt.get('ticket_id')))}</title>",
             "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
             "table{border-collapse:collapse;margin-bottom:1.5em}"
             "td,th{border:1px solid #999;padding:.25em .5em;text-align:left;"
             "font-family:monospace;word-break:break-all}</style></head><body>",
             f"<h1>Deletion receipt: ticket {esc(str(receipt.get('ticket_id')))}</h1>"]
    for title, header, rows in sections(receipt):
        parts.append(f"<h2>{esc(title)}</h2>")
        if not rows:
            parts.append("<p>(none)</p>")
            continue
        parts.append("<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("<p>Verify the JSON form of this receipt with "
                 "<code>oblivio receipt verify FILE</code>.</p></body></html>")
    return "\n".join(parts) + "\n"
