"""CI's check of the committed tables: each one under reports/ that has a shipped export beside it equals, byte for
byte, what `nox -s tables` rebuilds from that export alone (no training, no MLflow store). Run as the command itself,
in its own process, so that nothing another test left in this one can change what it writes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_committed_tables_equal_what_their_exports_give():
    assert (ROOT / "reports" / "embedded" / "runs.jsonl").is_file(), "the default table's export is not committed"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.cli", "tables", "--check"], cwd=ROOT, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "main_table.csv" in out.stdout + out.stderr
