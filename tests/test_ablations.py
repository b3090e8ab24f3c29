"""Ablations: the knob values the design asks for, the statistics against hand-computed values, and one
ablation end to end at the smoke profile (MLflow parent with every child, table, plot, reuse on a second call)."""

from __future__ import annotations

import math
import shutil

import numpy as np
import pandas as pd
import pytest

from experiments.checks.screenshot import ablation_runs, compare_url, screenshot_compare
from experiments.cli import ABLATION_CHOICES
from experiments.engine.tracking import Tracker
from experiments.tables import ablations as ab
from experiments.tables.ablations import ablation_markdown, ablation_table, build_ablations, run_ablations
from experiments.tables.reproduce import TableError


# ------------------------------------------------------------------------------------------ definitions
def test_default_ablations_cover_the_requested_values():
    table = build_ablations("default")
    assert tuple(table) == ab.ABLATION_NAMES == ABLATION_CHOICES
    labels = {k: [v.label for v in a.variants] for k, a in table.items()}
    assert labels["tokens"] == ["1", "2", "4", "6", "8", "16"]
    assert labels["dice"] == ["0", "0.1", "0.5", "1", "2", "5"]
    assert labels["stages_detection"] == ["P3", "P3-P4", "P3-P5", "P3-P7 (all)"]
    assert labels["stages_segmentation"] == ["logits", "backbone", "backbone+logits"]
    assert labels["masks"] == ["learned", "untrained", "uniform", "gt_box"]
    assert labels["weight_head"] == ["on", "off"]
    assert labels["custom_mask"][:2] == ["off", "on, warm-up 0"]
    for a in table.values():
        assert sum(v.official for v in a.variants) == 1, a.knob
        resolved = a.manifests()
        assert all(m.student_train.iterations == ab.ABLATION_ITERATIONS for _, m in resolved)
        # the official variant is the shipped manifest itself (only run length and warm-up rescaled)
        official = next(m for v, m in resolved if v.official)
        assert official.to_dict() == a.reference().to_dict()
    det = table["masks"].reference()
    assert det.maskd.custom_mask_warmup == round(ab.OFFICIAL_WARMUP_SHARE * ab.ABLATION_ITERATIONS)
    assert table["tokens"].manifests()[0][1].tokens.num_tokens == 1


def test_unknown_ablation_is_refused_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown ablation 'tokenz'"):
        run_ablations(["tokenz"], "smoke", f"sqlite:///{tmp_path / 'm.db'}", tmp_path, progress=False)
    assert not (tmp_path / "m.db").exists()


# ------------------------------------------------------------------------------------------ statistics
def _frame(values: dict[str, list[float]], teacher: float = 20.0) -> pd.DataFrame:
    rows = [{"kind": "teacher", "variant": "teacher", "method": "teacher", "seed": 0, "mIoU": teacher}]
    for label, vals in values.items():
        for seed, v in enumerate(vals):
            method = "baseline" if label == "baseline" else "maskd"
            rows.append(
                {"kind": "student", "variant": label, "method": method, "seed": seed, "mIoU": v, "step_time_s": 0.1}
            )
    return pd.DataFrame(rows)


def test_ablation_table_statistics_match_hand_computed_values():
    a = build_ablations("default")["weight_head"]
    a = ab.Ablation(a.knob, a.title, "embedded_segmentation", a.variants, a.why, a.base_overrides)
    frame = _frame({"baseline": [10.0, 12.0, 11.0], "on": [13.0, 14.0, 15.0], "off": [12.0, 12.5, 16.0]})
    table = ablation_table(frame, a).set_index("variant")
    on = table.loc["on"]
    # mean 14, sample std 1, t_{0.975,2} = 4.302653 -> ci95 = 4.302653 / sqrt(3) = 2.484138
    assert on["mean"] == pytest.approx(14.0)
    assert on["std"] == pytest.approx(1.0)
    assert on["ci95"] == pytest.approx(4.302653 / math.sqrt(3), rel=1e-6)
    assert on["ci95_low"] == pytest.approx(14.0 - 2.484138, rel=1e-6)
    # paired differences on vs baseline: 3, 2, 4 -> mean 3, sd 1, t = 3 / (1 / sqrt 3) = 5.196152, df 2
    # two-sided p = 2 * (1 - F_t2(5.196152)); F_t2(x) = 1/2 + x / (2 sqrt(x^2 + 2))
    t = 3 / (1 / math.sqrt(3))
    p = 2 * (1 - (0.5 + t / (2 * math.sqrt(t * t + 2))))
    assert on["paired_diff_vs_baseline"] == pytest.approx(3.0)
    assert on["p_vs_baseline"] == pytest.approx(p, rel=1e-6)
    assert math.isnan(on.get("paired_diff_vs_official", math.nan))  # the official row has no self-comparison
    off = table.loc["off"]
    # off - on: -1, -1.5, +1 -> mean -0.5, sd 1.3229 -> t = -0.654654, p = 2 * (1 - F(0.654654))
    d = np.array([-1.0, -1.5, 1.0])
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    p = 2 * (1 - (0.5 + abs(t) / (2 * math.sqrt(t * t + 2))))
    assert off["paired_diff_vs_official"] == pytest.approx(-0.5)
    assert off["p_vs_official"] == pytest.approx(p, rel=1e-6)
    md = ablation_markdown(ablation_table(frame, a), a, 60.0, "parent", "default", "env")
    assert "ci95" in md and "**not significant**" in md and "Protocol" in md and "weight_head.png" in md


def test_ablation_table_refuses_missing_and_non_finite_runs():
    a = build_ablations("default")["weight_head"]
    a = ab.Ablation(a.knob, a.title, "embedded_segmentation", a.variants, a.why, a.base_overrides)
    with pytest.raises(TableError, match="weight_head/off: 2 runs in MLflow, expected 3"):
        ablation_table(_frame({"baseline": [1, 2, 3], "on": [1, 2, 3], "off": [1, 2]}), a)
    with pytest.raises(TableError, match="non-finite mIoU"):
        ablation_table(_frame({"baseline": [1, 2, 3], "on": [1, float("nan"), 3], "off": [1, 2, 3]}), a)


# ------------------------------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def smoke_masks(tmp_path_factory):
    """The ``masks`` ablation at the smoke profile, once for the module, on a fresh sqlite store."""
    tmp = tmp_path_factory.mktemp("ablation")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MASKD_BENCH_CACHE", str(tmp_path_factory.getbasetemp() / "maskd-cache"))
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        done = run_ablations(["masks"], "smoke", uri, tmp / "out", progress=False, report=lambda _: None)
        yield uri, tmp, done


def test_one_ablation_end_to_end_at_smoke_profile(smoke_masks):
    uri, _, done = smoke_masks
    ((knob, csv_path, md_path, png, wall),) = done
    assert knob == "masks" and wall > 0
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    table = pd.read_csv(csv_path)
    assert table.variant.tolist() == ["teacher", "baseline", "learned", "untrained", "uniform", "gt_box"]
    assert {"mean", "std", "ci95", "ci95_low", "ci95_high", "p_vs_baseline", "p_vs_official"} <= set(table.columns)
    assert table["mean"].map(math.isfinite).all()
    assert (table.n_seeds[1:] == 2).all()
    text = md_path.read_text()
    assert "Ablation: Where the masks come from" in text and "gt_box" in text and "Protocol" in text

    tracker = Tracker(uri)
    parents = tracker.client.search_runs([tracker.experiment_id], "tags.kind = 'ablation' and tags.ablation = 'masks'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    children = tracker.children(parents[0].info.run_id)
    # teacher, 2 baseline students, tokens for "learned", 4 variants x 2 seeds
    assert len(children) == 1 + 2 + 1 + 4 * 2
    assert all(r.info.status == "FINISHED" for r in children)
    variants = {r.data.tags.get("variant") for r in children}
    assert variants == {"teacher", "baseline", "learned", "untrained", "uniform", "gt_box"}
    assert all(r.data.tags.get("ablation") == "masks" for r in children)
    artifacts = {a.path for a in tracker.client.list_artifacts(parents[0].info.run_id, "table")}
    assert artifacts == {"table/masks.csv", "table/masks.md", "table/masks.png"}
    parent_id, students = ablation_runs(tracker, "masks")
    assert parent_id == parents[0].info.run_id and len(students) == 2 + 4 * 2
    url = compare_url("http://127.0.0.1:5000", tracker.experiment_id, students)
    assert url.startswith("http://127.0.0.1:5000/#/compare-runs?runs=%5B%22") and students[0] in url


def test_second_call_reuses_every_run(smoke_masks, monkeypatch):
    uri, tmp, done = smoke_masks
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp.parent / "maskd-cache"))
    done2 = run_ablations(["masks"], "smoke", uri, tmp / "out2", progress=False, report=lambda _: None)
    assert pd.read_csv(done2[0][1])["mean"].tolist() == pd.read_csv(done[0][1])["mean"].tolist()
    tracker = Tracker(uri)
    latest, _ = ablation_runs(tracker, "masks")
    assert all("reused_from" in r.data.tags for r in tracker.children(latest))


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Chromium (apt-get install -y chromium)")
def test_compare_page_screenshot_in_headless_chromium(smoke_masks, tmp_path):
    uri, _, _ = smoke_masks
    png = screenshot_compare("masks", uri, tmp_path / "compare.png")
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 50_000


def test_ablation_tables_rebuild_from_their_export_alone(smoke_masks, tmp_path):
    """Each ablation ships ``<knob>.runs.jsonl``; ``nox -s tables`` (rebuild_tables) rewrites the table and plot
    from it, byte for byte, and the check names a table edited by hand."""
    from experiments.tables.reproduce import rebuild_tables

    _, tmp, done = smoke_masks
    ((knob, csv_path, md_path, png, _),) = done
    out = tmp_path / "reports"
    shutil.copytree(csv_path.parent, out)
    export = out / f"{knob}.runs.jsonl"
    assert export.is_file()
    assert ab.write_ablation_table(export, check=True) == []
    assert rebuild_tables(out, check=True)[1] == []
    (out / md_path.name).write_text(md_path.read_text().replace("Ablation", "Ablatoin"))
    (out / png.name).unlink()
    assert sorted(rebuild_tables(out, check=True)[1]) == sorted([out / md_path.name, out / png.name])
    rebuild_tables(out)
    assert rebuild_tables(out, check=True)[1] == []
    assert (out / png.name).read_bytes() == png.read_bytes()


def test_default_ablations_take_maskd_weight_from_the_main_tables_val_choice(tmp_path):
    from experiments.engine.manifest import load_manifest
    from experiments.tables.export import read_export
    from experiments.tables.tuning import choose

    record, runs = read_export(ab.Path.cwd() / ab.MAIN_TABLE_EXPORT)
    frame = ab.runs_frame(runs)
    table = build_ablations("default")
    for a in table.values():
        m = load_manifest(a.manifest)
        expected = choose(frame, m)["maskd"].multiplier
        assert ab.multiplier_of(a) == expected
        assert all(v.maskd.loss_weight == m.maskd.loss_weight * expected for _, v in a.manifests())
        assert "chosen on val" in a.weight_note
    no_choice = build_ablations("default", {})["masks"]
    assert no_choice.reference().maskd.loss_weight == load_manifest("embedded_detection").maskd.loss_weight
    assert "calibrated value" in no_choice.weight_note and "chosen" not in no_choice.weight_note
    with pytest.raises(TableError, match="main table's shipped record is missing"):
        ab.main_table_multipliers(tmp_path / "runs.jsonl")
