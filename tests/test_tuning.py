"""The equal tuning budget (experiments.tables.tuning) and the reported split (report.on_split), on made-up runs:
the choice is made on val only, ties go to the multiplier nearest 1, and a table that reports other weights than
the val choice, or a split its runs lack, is refused."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from experiments.engine.executors import StageGraph
from experiments.engine.manifest import ManifestError, load_manifest
from experiments.tables import tuning
from experiments.tables.report import SplitError, on_split, with_choices


@pytest.fixture(scope="module")
def smoke():
    return load_manifest("embedded_segmentation_smoke", sets=["protocol.weight_grid=[0.25, 1.0, 4.0]"])


def _runs(smoke, val: dict[str, dict[float, float]], test_offset: float = 100.0) -> pd.DataFrame:
    """Tuning runs with the given val mIoU; test mIoU is val + offset, so a choice on test would differ."""
    rows = []
    for method, values in val.items():
        for multiplier, value in values.items():
            rows.append(
                {
                    "task": smoke.task,
                    "method": method,
                    "status": "FINISHED",
                    "kind": "student",
                    "seed": 0,
                    "tuning": "true",
                    "weight_multiplier": tuning.label(multiplier),
                    "mIoU": value,
                    "test/mIoU": test_offset - value,
                }  # fmt: skip
            )
    return pd.DataFrame(rows)


def test_scaled_changes_only_the_methods_weight_knob(smoke):
    scaled = tuning.scaled(smoke, "cwd", 4.0)
    assert scaled.cwd.loss_weight == pytest.approx(4 * smoke.cwd.loss_weight)
    assert scaled.cwd.tau == smoke.cwd.tau and scaled.maskd == smoke.maskd
    assert tuning.scaled(smoke, "mgd", 0.25).mgd.alpha_mgd == pytest.approx(smoke.mgd.alpha_mgd / 4)
    assert tuning.scaled(smoke, "cwd", 1.0) is smoke


def test_choice_is_made_on_val_and_ties_go_to_the_calibrated_weight(smoke):
    methods = [m for m in smoke.methods if m != "baseline"]
    val = {m: {0.25: 10.0, 1.0: 12.0, 4.0: 11.0} for m in methods}
    val["cwd"] = {0.25: 15.0, 1.0: 12.0, 4.0: 11.0}
    val["fitnet"] = {0.25: 12.0, 1.0: 12.0, 4.0: 12.0}  # a tie: the calibrated value
    val["mgd"] = {0.25: 9.0, 1.0: 9.0, 4.0: 9.5}
    choices = tuning.choose(_runs(smoke, val), smoke)
    assert choices["cwd"].multiplier == 0.25 and choices["cwd"].val[0.25] == 15.0
    assert choices["fitnet"].multiplier == 1.0
    assert choices["mgd"].multiplier == 4.0
    assert choices["cwd"].weight == pytest.approx(smoke.cwd.loss_weight / 4)
    assert tuning.choose_multiplier({0.25: 1.0, 4.0: 1.0}) == 0.25  # equal distance from 1: the smaller one


def test_missing_or_non_finite_tuning_run_is_refused(smoke):
    methods = [m for m in smoke.methods if m != "baseline"]
    val = {m: {0.25: 10.0, 1.0: 12.0, 4.0: 11.0} for m in methods}
    frame = _runs(smoke, val)
    with pytest.raises(tuning.TuningError, match=r"cwd x4: 0 finished"):
        tuning.choose(frame[~((frame.method == "cwd") & (frame.weight_multiplier == "4"))], smoke)
    frame.loc[frame.method == "pkd", "mIoU"] = math.nan
    with pytest.raises(tuning.TuningError, match="pkd"):
        tuning.choose(frame, smoke)


def test_table_runs_must_use_the_chosen_weight(smoke):
    methods = [m for m in smoke.methods if m != "baseline"]
    frame = _runs(smoke, {m: {0.25: 15.0, 1.0: 12.0, 4.0: 11.0} for m in methods})
    choices = tuning.choose(frame, smoke)
    table = pd.DataFrame(
        [
            {
                "task": smoke.task,
                "method": m,
                "status": "FINISHED",
                "kind": "student",
                "seed": s,
                "tuning": "",
                "weight_multiplier": "0.25",
                "mIoU": 1.0,
            }
            for m in methods
            for s in smoke.protocol.seeds
        ]  # fmt: skip
    )
    tuning.check_reported(pd.concat([frame, table]), smoke, choices)
    table.loc[table.method == "cwd", "weight_multiplier"] = "1"
    with pytest.raises(tuning.TuningError, match=r"cwd: .*chose x0.25"):
        tuning.check_reported(pd.concat([frame, table]), smoke, choices)


def test_graphs_tune_at_the_tune_seed_then_run_every_seed_at_the_choice(smoke):
    graph = StageGraph()
    tuning.add_tuning(graph, smoke)
    students = [n for n in graph.nodes.values() if n.kind == "student"]
    methods = [m for m in smoke.methods if m != "baseline"]
    assert len(students) == 3 * len(methods) and {n.seed for n in students} == {smoke.protocol.tune_seed}
    assert all(n.labels["tuning"] == "true" and n.key.startswith("tune/x") for n in students)
    main = StageGraph()
    tuning.add_main(main, smoke, {"cwd": 4.0})
    cwd = [n for n in main.nodes.values() if n.method == "cwd"]
    assert [n.seed for n in cwd] == smoke.protocol.seeds and {n.labels["weight_multiplier"] for n in cwd} == {"4"}
    # the table's seed-0 cwd run at x4 is the tuning run at x4: the same stage hash (reused, not retrained)
    tuned = next(n for n in students if n.method == "cwd" and n.labels["weight_multiplier"] == "4")
    assert tuned.config_hash == next(n for n in cwd if n.seed == smoke.protocol.tune_seed).config_hash


def test_reported_split_replaces_val_metrics_by_test(smoke):
    frame = pd.DataFrame([{"task": smoke.task, "method": "baseline", "mIoU": 5.0, "test/mIoU": 7.0}])
    assert on_split(frame, [smoke]).mIoU.tolist() == [7.0]
    with pytest.raises(SplitError, match="test/mIoU"):
        on_split(frame.drop(columns=["test/mIoU"]), [smoke])
    table = pd.DataFrame(
        [{"task": smoke.task, "method": m, "metric": "mIoU", "mean": 1.0} for m in ("baseline", "cwd")]
    )
    out = with_choices(table, [smoke], [])
    assert out.split.tolist() == ["test", "test"] and out.loss_weight_knob.tolist() == ["", "loss_weight"]
    assert out.loss_weight.iloc[1] == pytest.approx(smoke.cwd.loss_weight)


def test_manifest_refuses_a_test_split_it_does_not_have_and_a_grid_without_one():
    with pytest.raises(ManifestError, match=r"protocol.eval_split.*data.num_test"):
        load_manifest("embedded_detection_smoke", sets=["data.num_test=0"])
    with pytest.raises(ManifestError, match=r"protocol.weight_grid.*1.0"):
        load_manifest("embedded_detection_smoke", sets=["protocol.weight_grid=[0.5, 2.0]"])
    # a tuning seed outside the table's seeds is allowed: its runs are then not reused by the table
    assert load_manifest("embedded_detection_smoke", sets=["protocol.tune_seed=7"]).protocol.tune_seed == 7
