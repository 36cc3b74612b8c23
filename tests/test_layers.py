"""The layering in DESIGN.md as a contract: `lint-imports` with the contracts in pyproject.toml."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _lint_imports() -> subprocess.CompletedProcess[str]:
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"
    return subprocess.run([exe, "--no-cache"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


def test_import_contracts_are_kept() -> None:
    result = _lint_imports()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_nothing_below_the_web_layer_reads_settings() -> None:
    # The layers contract catches imports of `service`; this also catches the environment.
    reads = re.compile(r"(environ|getenv)\b[^\n]*OBLIVIO_|get_settings\(")
    offenders = [str(p.relative_to(REPO)) for pkg in ("storage", "workers")
                 for p in (REPO / pkg).rglob("*.py") if reads.search(p.read_text())]
    assert offenders == []
