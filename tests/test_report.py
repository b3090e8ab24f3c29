"""Table statistics against values computed by hand, and the table's rows and sentences on a synthetic frame."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from experiments.tables.report import ci95, findings, main_table, markdown, paired, write_table


def test_ci95_matches_the_t_table():
    # n = 3, std = 1: t_{0.975, 2} = 4.3027 (Student t table), half-width 4.3027 / sqrt(3) = 2.4841.
    assert ci95(np.array([1.0, 2.0, 3.0])) == pytest.approx(2.48414, abs=1e-4)
    # n = 5, std = sqrt(2.5): t_{0.975, 4} = 2.7764, half-width 2.7764 * 1.5811 / sqrt(5) = 1.9632.
    assert ci95(np.array([1.0, 2.0, 3.0, 4.0, 5.0])) == pytest.approx(1.96324, abs=1e-4)
    assert math.isnan(ci95(np.array([4.0])))


def _frame(rows):
    return pd.DataFrame(
        rows, columns=["task", "method", "seed", "kind", "mAP", "step_time_s", "params", "added_params"]
    )


def test_paired_t_test_by_hand():
    frame = _frame(
        [("detection", "maskd", s, "student", v, 1, 1, 0) for s, v in enumerate([1.0, 2.0, 3.0])]
        + [("detection", "baseline", s, "student", v, 1, 1, 0) for s, v in enumerate([0.5, 1.9, 2.4])]
    )
    result = paired(frame, "mAP", "maskd", "baseline")
    # differences 0.5, 0.1, 0.6: mean 0.4, sd 0.26458, t = 0.4 / (0.26458 / sqrt 3) = 2.6186 with 2 df,
    # two-sided p = 0.1200 (t distribution, 2 df: p = 1 - t / sqrt(t^2 + 2)).
    t = 0.4 / (math.sqrt(0.07) / math.sqrt(3))
    assert result.diff == pytest.approx(0.4)
    assert result.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2), rel=1e-9)
    assert result.n == 3
    # Seeds are matched, not positions: a missing seed is left out of both sides.
    partial = frame[~((frame.method == "baseline") & (frame.seed == 2))]
    assert paired(partial, "mAP", "maskd", "baseline").n == 2


def test_main_table_rows_and_sentences(tmp_path):
    rows = [("detection", "teacher", 0, "teacher", 20.0, 0.3, 1e7, 0)]
    values = {"baseline": [10.0, 10.5, 11.0], "fitnet": [10.2, 10.4, 11.1], "maskd": [12.0, 12.6, 13.1]}
    for method, vals in values.items():
        rows += [
            (
                "detection",
                method,
                s,
                "student",
                v,
                0.2 if method != "baseline" else 0.1,
                1e6,
                0 if method == "baseline" else 5000,
            )
            for s, v in enumerate(vals)
        ]
    table = main_table(_frame(rows), {"detection": "fcos"})
    assert list(table.method) == ["teacher", "baseline", "fitnet", "maskd"]
    maskd = table[table.method == "maskd"].iloc[0]
    assert maskd["mean"] == pytest.approx(12.5667, abs=1e-4) and maskd["n_seeds"] == 3
    assert maskd["delta_vs_baseline"] == pytest.approx(2.0667, abs=1e-4)
    assert maskd["gap_closed_pct"] == pytest.approx(100 * 2.0667 / (20 - 10.5), abs=1e-2)
    assert maskd["step_time_rel"] == pytest.approx(2.0)
    assert maskd["best_other"] == "fitnet" and maskd["paper_gain"] == pytest.approx(4.4)
    text = "\n".join(findings(table, "detection"))
    assert "Teacher − baseline student gap: +9.50 points." in text
    assert "fitnet: +0.07 vs baseline" in text and "not significant" in text
    assert "maskd: +2.07 vs baseline" in text and "significant at α = 0.05" in text
    md = markdown(table, [], "test env", 60.0, "default", "run123")
    csv_path, md_path = write_table(table, md, tmp_path)
    assert md_path.read_text() == md and pd.read_csv(csv_path).shape[0] == 4
    assert not list(tmp_path.glob("*.tmp"))


def test_holm_adjustment_by_hand():
    from experiments.tables.report import holm_adjust

    rows = [
        {"p_vs_baseline": 0.01, "p_vs_best_other": 0.04},
        {"p_vs_baseline": 0.03, "p_vs_best_other": math.nan},  # no test: not counted
    ]
    assert holm_adjust(rows, ("p_vs_baseline", "p_vs_best_other")) == 3
    # sorted 0.01, 0.03, 0.04 -> 3 x 0.01 = 0.03, max(0.03, 2 x 0.03) = 0.06, max(0.06, 1 x 0.04) = 0.06
    assert rows[0]["p_vs_baseline_holm"] == pytest.approx(0.03)
    assert rows[1]["p_vs_baseline_holm"] == pytest.approx(0.06)
    assert rows[0]["p_vs_best_other_holm"] == pytest.approx(0.06)
    assert math.isnan(rows[1]["p_vs_best_other_holm"]) and rows[0]["n_comparisons"] == 3
