"""The house's structure: the import-linter contract (layers import downward only, no cycle
between the modules of a package) holds, and no source file passes the one-idea size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO


def test_import_linter_contract_is_kept():
    exe = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(exe), "--config", str(REPO / "pyproject.toml")], cwd=REPO, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_no_source_file_over_400_lines():
    long = {str(p.relative_to(REPO)): n for p in (REPO / "src" / "ldm_lab").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, f"files over 400 lines (one file, one idea): {long}"
