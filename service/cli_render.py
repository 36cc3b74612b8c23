"""How the CLI shows things to people (rich tables); `--json` bypasses all of this."""

from __future__ import annotations

import json
import sys
from typing import Any

from rich.console import Console
from rich.table import Table



def out() -> Console:
    # Built per call, so it writes to whatever sys.stdout is now (tests swap it), and wide
    # when piped: rich would otherwise squeeze tables into 80 columns and cut ids.
    return Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def err() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


def print_json(value: Any) -> None:
    # Plain print, not rich: scripts parse this, and rich would wrap long lines.
    print(json.dumps(value, indent=2, sort_keys=True, default=str))


def _short_time(value: str | None) -> str:
    return (value or "")[:19].replace("T", " ")


def ticket_table(items: list[dict[str, Any]]) -> Table:
    table = Table(show_lines=False)
    table.add_column("id", no_wrap=True, min_width=36)
    for name in ("status", "kind", "lineage", "engine", "target", "created (UTC)", "version"):
        table.add_column(name)
    for t in items:
        version = (t.get("result_version") or {}).get("label", "")
        table.add_row(t["id"], t["status"], t["kind"], t["lineage"], t["engine"],
                      t.get("target") or "", _short_time(t.get("created_at")), version)
    return table


def ticket_detail(t: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    version = t.get("result_version") or {}
    rows = [
        ("id", t["id"]), ("status", t["status"]), ("kind", t["kind"]),
        ("lineage", t["lineage"]), ("engine", t["engine"]), ("target", t.get("target") or ""),
        ("priority", str(t.get("priority", 0))), ("attempts", str(t.get("attempts", 0))),
        ("created", t.get("created_at") or ""), ("updated", t.get("updated_at") or ""),
        ("not before", t.get("not_before") or ""), ("requester", t.get("requester") or ""),
        ("idempotency key", t.get("idempotency_key") or ""),
        ("payload sha256", t.get("payload_sha256") or ""),
        ("request", json.dumps(t["summary"]) if t.get("summary") else "(purged)"),
        ("progress", json.dumps(t["progress"]) if t.get("progress") else ""),
        ("result version", version.get("label", "")),
        ("error", t.get("error") or ""),
    ]
    review = t.get("review") or {}
    if review:
        rows.append(("review", f"verdict {review.get('verdict') or '?'}: "
                               f"{review.get('reason', '')}"))
        for check in review.get("checks") or []:
            rows.append((f"  {check.get('name')}", _check_figures(check)))
    for key, value in rows:
        if value:
            table.add_row(key, value)
    return table


def _check_figures(check: dict[str, Any]) -> str:
    def num(value: Any) -> str:
        return "n/a" if value is None else f"{value:.2f}"

    verdict = {True: "passed", False: "FAILED", None: "not measured"}[check.get("passed")]
    return (f"{num(check.get('value'))} (needs {check.get('op')} {check.get('threshold')}; "
            f"before {num(check.get('before'))}, after {num(check.get('after'))}) {verdict}")


def timeline_table(events: list[dict[str, Any]]) -> Table:
    """A ticket's history, oldest first; the detail column says why (version, reason...)."""
    table = Table(title="timeline", title_justify="left")
    for name in ("at (UTC)", "event", "by", "detail"):
        table.add_column(name)
    for e in events:
        detail = e.get("detail") or {}
        shown = ", ".join(f"{k}={v}" for k, v in detail.items()
                          if v not in (None, "", [], {}) and k not in ("payload_sha256",))
        table.add_row(_short_time(e.get("at")), e.get("event", ""), e.get("actor", ""), shown)
    return table


def mapping_detail(values: dict[str, Any]) -> Table:
    table = Table(show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    for key, value in values.items():
        if isinstance(value, (dict, list)):
            value = json.dumps(value, sort_keys=True)
        table.add_row(str(key), "" if value is None else str(value))
    return table


def version_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("version", no_wrap=True)
    table.add_column("id", no_wrap=True, min_width=36)
    for name in ("status", "aliases", "sha256", "created (UTC)"):
        table.add_column(name)
    for v in items:
        table.add_row(v["label"], v["id"], v["status"], ", ".join(v.get("aliases") or []),
                      (v.get("sha256") or "")[:12], _short_time(v.get("created_at")))
    return table


def lineage_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    for name in ("name", "engine", "base model", "aliases", "created (UTC)"):
        table.add_column(name)
    for lineage in items:
        aliases = ", ".join(f"{k}={v}" for k, v in sorted((lineage.get("aliases") or {}).items()))
        table.add_row(lineage["name"], lineage["engine"], lineage["base_model"], aliases,
                      _short_time(lineage.get("created_at")))
    return table


def token_table(items: list[dict[str, Any]]) -> Table:
    table = Table()
    table.add_column("id", no_wrap=True, min_width=36)
    for name in ("name", "role", "created (UTC)", "revoked"):
        table.add_column(name)
    for t in items:
        table.add_row(t["id"], t["name"], t["role"], _short_time(t.get("created_at")),
                      _short_time(t.get("revoked_at")))
    return table
