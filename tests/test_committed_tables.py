"""CI's check of the committed tables: each one under reports/ that has a shipped export beside it equals, byte for
byte, what `nox -s tables` rebuilds from that export alone (no training, no MLflow store)."""

from __future__ import annotations

from pathlib import Path

from experiments.tables.reproduce import rebuild_tables

REPORTS = Path(__file__).resolve().parents[1] / "reports"


def test_committed_tables_equal_what_their_exports_give():
    assert (REPORTS / "embedded" / "runs.jsonl").is_file(), "the default table's export is not committed"
    handled, differing = rebuild_tables(REPORTS, check=True)
    assert REPORTS / "embedded" / "main_table.csv" in handled
    assert differing == [], f"edited by hand or stale (rerun `nox -s tables`): {differing}"
