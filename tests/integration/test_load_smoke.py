"""The load benchmark, short, as a test of what it checks (not of speed): at 1x and 10x
submission rates with concurrent polling, no ticket is lost, none duplicated, every client
retry with the same Idempotency-Key gets the same ticket, and no request fails."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_load_loses_and_duplicates_no_ticket_and_fails_no_request() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "load.py"), "--no-train", "--no-generate",
         "--seconds", "4", "--rate", "3"],
        capture_output=True, text=True, timeout=240, cwd=REPO, check=False)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "tickets lost: 0, duplicated: 0" in out, out[-3000:]
    rows = [line for line in out.splitlines() if re.match(r"\| none \| \d+(\.\d+)?/s \(", line)]
    assert len(rows) == 2, out[-3000:]
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[10].split()[0] == "0", row  # errors
        retried, sent = cells[11].split("/")
        assert retried == sent, row
    print("\n" + "\n".join(line for line in out.splitlines()
                            if line.startswith(("|", "[none] tickets"))))
