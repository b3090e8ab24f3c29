"""Tables from tracked runs only: the embedded main table (md + csv), with seeds, intervals and paired tests.

Statistics (scipy): mean and sample std over seeds; a 95% Student-t confidence interval of the mean
(``t_{0.975, n-1} * std / sqrt(n)``); for each method the paired difference from the baseline student and from the
best other distillation method on matched seeds, with a paired t-test's two-sided p-value. With fewer than two
matched seeds there is no interval and no test (NaN), and the table says so.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.entities import Run
from scipy import stats
from statsmodels.stats.multitest import multipletests

from ..datasets import kind_of
from ..engine.manifest import Manifest
from ..methods import table_order
from ..tasks import get_task, tasks
from .paper import PAPER

ALPHA = 0.05


def primary_metric(task: str) -> str:
    return get_task(task).primary_metric


def secondary_metrics(task: str) -> list[str]:
    return list(get_task(task).secondary_metrics)


def row_order(present) -> list[str]:
    """Table rows: teacher, baseline, then the registered methods in their order; a method found in the runs but
    not registered (a plug-in no longer loaded) still gets a row, at the end, rather than vanishing."""
    known = table_order()
    present = set(present)
    return [m for m in known if m in present] + sorted(present - set(known))


def task_order(present) -> list[str]:
    present = set(present)
    return [t for t in tasks() if t in present]


def runs_frame(runs: Sequence[Run]) -> pd.DataFrame:
    """One row per teacher/student run: task, method, seed, kind and every final metric."""
    rows = []
    for run in runs:
        tags = run.data.tags
        if tags.get("kind") not in ("teacher", "student"):
            continue
        row = {
            "run_id": run.info.run_id,
            "status": run.info.status,
            "task": tags.get("task"),
            "method": tags.get("method"),
            "seed": int(tags.get("seed", 0)),
            "kind": tags["kind"],
            "reused_from": tags.get("reused_from", ""),
            # the equal tuning budget (experiments.tables.tuning): tuning runs and the multiplier of a run's weight
            "tuning": tags.get("tuning", ""),
            "weight_multiplier": tags.get("weight_multiplier", ""),
        }
        row.update(run.data.metrics)
        rows.append(row)
    return pd.DataFrame(rows)


TEST_PREFIX = "test/"


class SplitError(RuntimeError):
    """A table reports a split that its runs were not evaluated on."""


def on_split(frame: pd.DataFrame, manifests: Sequence[Manifest]) -> pd.DataFrame:
    """``frame`` with each task's metrics taken from the split its manifest reports (``protocol.eval_split``):
    runs log val metrics under their own names and test metrics as ``test/<name>``; for a task reported on test,
    the ``test/`` columns replace the plain ones (and the val ones are dropped, so nothing reads them by mistake)."""
    if frame.empty:
        return frame
    out = frame.copy()
    test_columns = [c for c in frame.columns if c.startswith(TEST_PREFIX)]
    for m in manifests:
        if m.protocol.eval_split != "test":
            continue
        rows = out.task == m.task
        metric = primary_metric(m.task)
        if TEST_PREFIX + metric not in out or out.loc[rows, TEST_PREFIX + metric].isna().any():
            raise SplitError(f"{m.task}: protocol.eval_split = 'test' but some runs have no {TEST_PREFIX + metric}")
        for column in test_columns:
            out.loc[rows, column[len(TEST_PREFIX) :]] = out.loc[rows, column]
    return out.drop(columns=test_columns)


def ci95(values: np.ndarray) -> float:
    n = len(values)
    if n < 2:
        return math.nan
    return float(stats.t.ppf(0.975, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


@dataclass
class Paired:
    diff: float
    p_value: float
    n: int


def paired(frame: pd.DataFrame, metric: str, a: str, b: str) -> Paired:
    """Mean of ``a - b`` over the seeds both have, and the paired t-test's p-value."""
    left = frame[frame.method == a].set_index("seed")[metric]
    right = frame[frame.method == b].set_index("seed")[metric]
    seeds = sorted(set(left.index) & set(right.index))
    if not seeds:
        return Paired(math.nan, math.nan, 0)
    x, y = left.loc[seeds].to_numpy(float), right.loc[seeds].to_numpy(float)
    diff = float(np.mean(x - y))
    if len(seeds) < 2 or np.allclose(x - y, (x - y)[0]):
        return Paired(diff, math.nan, len(seeds))
    return Paired(diff, float(stats.ttest_rel(x, y).pvalue), len(seeds))


def main_table(frame: pd.DataFrame, paper_keys: dict[str, str] | None = None) -> pd.DataFrame:
    """The main table: one row per task x method (teacher first), primary metric statistics and comparisons.

    ``paper_keys`` maps a task to its paper setting in :data:`experiments.tables.paper.PAPER` (the teacher's
    architecture: ``fcos``, ``retinanet``, ``deeplabv3``).
    """
    paper_keys = paper_keys or {}
    out = []
    for task in task_order(frame.task if not frame.empty else []):
        sub = frame[frame.task == task]
        if sub.empty:
            continue
        metric = primary_metric(task)
        students = sub[sub.kind == "student"]
        base = students[students.method == "baseline"]
        teacher = sub[sub.kind == "teacher"]
        base_mean = base[metric].mean() if not base.empty else math.nan
        teacher_mean = teacher[metric].mean() if not teacher.empty else math.nan
        base_time = base["step_time_s"].mean() if "step_time_s" in base and not base.empty else math.nan
        methods = row_order(sub.method)
        distill_methods = [m for m in methods if m not in ("teacher", "baseline")]
        for method in methods:
            rows = sub[sub.method == method]
            values = rows[metric].to_numpy(float)
            paper = PAPER.get(paper_keys.get(task, ""), {}).get(method)
            row = {
                "task": task,
                "method": method,
                "metric": metric,
                "mean": float(np.mean(values)),
                "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
                "n_seeds": len(values),
                "ci95": ci95(values),
            }
            for extra in secondary_metrics(task):
                if extra in rows:
                    row[f"{extra}_mean"] = float(np.nanmean(rows[extra].to_numpy(float)))
            if method != "teacher":
                row["delta_vs_baseline"] = row["mean"] - base_mean
                gap = teacher_mean - base_mean
                row["gap_closed_pct"] = 100 * row["delta_vs_baseline"] / gap if gap > 0 else math.nan
            if method in distill_methods:
                vs_base = paired(students, metric, method, "baseline")
                row["paired_diff_vs_baseline"], row["p_vs_baseline"] = vs_base.diff, vs_base.p_value
                others = [m for m in distill_methods if m != method]
                if others:
                    best = max(others, key=lambda m: students[students.method == m][metric].mean())
                    vs_best = paired(students, metric, method, best)
                    row["best_other"] = best
                    row["paired_diff_vs_best_other"], row["p_vs_best_other"] = vs_best.diff, vs_best.p_value
            row["params"] = float(rows["params"].mean()) if "params" in rows else math.nan
            row["added_params"] = float(rows["added_params"].mean()) if "added_params" in rows else math.nan
            if method != "teacher" and "step_time_s" in rows:
                row["step_time_rel"] = float(rows["step_time_s"].mean() / base_time) if base_time else math.nan
            row["paper_value"] = paper.value if paper else math.nan
            row["paper_gain"] = paper.gain if paper and paper.gain is not None else math.nan
            row["paper_source"] = paper.source if paper else ""
            out.append(row)
        holm_adjust([r for r in out if r["task"] == task], ("p_vs_baseline", "p_vs_best_other"))
    return pd.DataFrame(out)


def with_choices(table: pd.DataFrame, manifests: Sequence[Manifest], choices: Sequence = ()) -> pd.DataFrame:
    """The table with the split it reports and each method's loss weight: the knob, the value the runs used and
    its multiplier of the calibrated value (1 where there was no tuning)."""
    from .tuning import loss_weight, weight_knob

    chosen = {(c.task, c.method): c for c in choices}
    split = {m.task: m.protocol.eval_split for m in manifests}
    by_task = {m.task: m for m in manifests}
    out = table.copy()
    out.insert(3, "split", [split.get(t, "val") for t in out.task])
    knobs, weights, multipliers = [], [], []
    for task, method in zip(out.task, out.method):
        m = by_task.get(task)
        if method in ("teacher", "baseline") or m is None:
            knobs.append("")
            weights.append(math.nan)
            multipliers.append(math.nan)
            continue
        c = chosen.get((task, method))
        multiplier = c.multiplier if c is not None else 1.0
        knobs.append(weight_knob(method))
        weights.append(loss_weight(m, method) * multiplier)
        multipliers.append(multiplier)
    out.insert(4, "loss_weight_knob", knobs)
    out.insert(5, "loss_weight", weights)
    out.insert(6, "weight_multiplier", multipliers)
    return out


def holm_adjust(rows: list[dict], columns: Sequence[str]) -> int:
    """Holm's step-down correction across every p-value in ``columns`` of ``rows`` (one table's comparisons),
    written to ``<column>_holm``; returns the number of comparisons. NaN p-values (no test) are not counted."""
    cells = [(r, c) for r in rows for c in columns if c in r and not math.isnan(r[c])]
    for r in rows:
        for c in columns:
            if c in r:
                r[f"{c}_holm"] = math.nan
    if cells:
        adjusted = multipletests([r[c] for r, c in cells], alpha=ALPHA, method="holm")[1]
        for (r, c), p in zip(cells, adjusted):
            r[f"{c}_holm"] = float(p)
    for r in rows:
        r["n_comparisons"] = len(cells)
    return len(cells)


def _known(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


def _fmt(value, digits: int = 2, signed: bool = False) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:+.{digits}f}" if signed else f"{value:.{digits}f}"


def _p(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.3f}" if value >= 0.001 else "<0.001"


def _params(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value / 1e6:.2f} M" if value >= 1e5 else f"{int(value):,}"


def markdown(
    table: pd.DataFrame,
    manifests: Sequence[Manifest],
    environment: str,
    wall_time_s: float | None,
    profile: str,
    parent_run_id: str,
    choices: Sequence = (),
) -> str:
    from .tuning import protocol_line

    lines = [
        f"# Embedded benchmark: main table (profile `{profile}`)",
        "",
        f"Generated by `nox -s reproduce_table` from MLflow runs only (parent run `{parent_run_id}`); do not edit.",
        "",
    ]
    for task in task_order(table.task if not table.empty else []):
        sub = table[table.task == task]
        if sub.empty:
            continue
        manifest = next((m for m in manifests if m.task == task), None)
        metric = primary_metric(task)
        lines += [f"## {task.capitalize()} ({metric}, %)", ""]
        if manifest is not None:
            lines += [f"Stands in for: {manifest.paper_row}.", ""]
        split = manifest.protocol.eval_split if manifest is not None else "val"
        header = [
            "method",
            "loss weight (× calibrated)",
            f"{metric} ({split}) mean ± std",
            "n",
            "95% CI",
            "Δ vs baseline",
            "p (paired)",
            "p (Holm)",
            "gap closed",
            "best other: Δ, p",
        ]
        if secondary_metrics(task):
            header += secondary_metrics(task)
        header += ["params", "added params", "step time ×", "paper", "paper Δ"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for _, r in sub.iterrows():
            best = (
                f"{r.get('best_other')}: {_fmt(r.get('paired_diff_vs_best_other'), signed=True)}, "
                f"{_p(r.get('p_vs_best_other'))}"
                if isinstance(r.get("best_other"), str)
                else "–"
            )
            weight = r.get("loss_weight")
            cells = [
                r.method,
                f"{weight:.3g} (×{r.get('weight_multiplier'):g})" if _known(weight) else "–",
                f"{_fmt(r['mean'])} ± {_fmt(r['std'])}",
                str(int(r.n_seeds)),
                f"±{_fmt(r.ci95)}",
                _fmt(r.get("delta_vs_baseline"), signed=True) if r.method != "teacher" else "–",
                _p(r.get("p_vs_baseline")),
                _p(r.get("p_vs_baseline_holm")),
                f"{_fmt(r.get('gap_closed_pct'), 0)}%" if r.method not in ("teacher", "baseline") else "–",
                best,
            ]
            cells += [_fmt(r.get(f"{e}_mean")) for e in secondary_metrics(task)]
            cells += [
                _params(r.get("params")),
                _params(r.get("added_params")) if r.method != "teacher" else "–",
                _fmt(r.get("step_time_rel")) if r.method != "teacher" else "–",
                _fmt(r.get("paper_value")),
                _fmt(r.get("paper_gain"), signed=True),
            ]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + findings(sub, task) + [""]
    lines += ["## Protocol", ""]
    for m in manifests:
        t, s = m.teacher_train, m.student_train
        lines.append(
            f"- **{m.task}** (`{Path(m.source).name}`): {m.description}. {kind_of(m.data).describe(m.data)}. "
            f"Teacher: {t.iterations} iterations, one run "
            f"(seed 0). Students: {s.iterations} iterations at batch {s.batch_size}, {s.optimizer} lr {s.lr} "
            f"{s.schedule}, the same recipe for every method; seeds {m.protocol.seeds}. "
            f"Tokens: {m.tokens.num_tokens} per level, {m.tokens.iterations} iterations. "
            + _starts(m)
            + f"Reported: the {m.protocol.checkpoint} checkpoint on the {m.protocol.eval_split} split, no selection"
            + (" (every choice made on val)." if m.protocol.eval_split == "test" else ".")
        )
        tuned = protocol_line(list(choices), m)
        if tuned:
            lines.append(tuned)
    lines += [
        "- Statistics: mean ± sample std over seeds; 95% CI = Student t half-width of the mean; Δ and p: paired "
        "t-test on matched seeds (two-sided), against the baseline student and against the best other "
        "distillation method (by mean). 'p (Holm)': the p-value against the baseline after Holm's correction "
        "across all comparisons of the task's table (both columns of every method); verdicts use it. "
        "'gap closed' = Δ vs baseline / (teacher − baseline).",
        "- The teacher and the receptive tokens are one run each (seed 0): their variance is not in the intervals.",
        "- 'added params': parameter elements the method adds during training (align convs, FGD's GcBlocks, "
        "MasKD's frozen tokens and head); none are kept at inference. 'step time ×': mean training-step time "
        "relative to the baseline student's (the teacher's forward, or the look-up of its cached features, "
        "included for distillation methods).",
        "- 'paper': the number of the corresponding real setting (COCO / Cityscapes, see "
        "`experiments/tables/paper.py` for sources); its Δ is the paper's gain over its own baseline. The embedded "
        "numbers are not comparable in absolute terms, only in sign and rough size.",
        f"- Environment: {environment}."
        + (f" Wall time of this table: {wall_time_s / 60:.1f} min (reused runs cost nothing)." if wall_time_s else ""),
    ]
    return "\n".join(lines) + "\n"


def _starts(m: Manifest) -> str:
    """Where the models start and where the teacher's features come from, in a sentence or two."""
    p = m.pretrain
    out = (
        f"Teacher and student bodies start from their own digit-classification pretraining ({p.iterations} "
        f"iterations at batch {p.batch_size}, {p.num_images} images of {p.image_size} px; `[pretrain]`). "
        if p.enabled
        else "Models start from scratch. "
    )
    if m.distill.teacher_cache:
        out += "The teacher's features of each training image are computed once per teacher and looked up. "
    return out


def findings(sub: pd.DataFrame, task: str) -> list[str]:
    """Plain sentences: the teacher-student gap and which differences are (not) significant."""
    out = []
    teacher = sub[sub.method == "teacher"]
    base = sub[sub.method == "baseline"]
    if not teacher.empty and not base.empty:
        gap = float(teacher["mean"].iloc[0] - base["mean"].iloc[0])
        out.append(
            f"Teacher − baseline student gap: {gap:+.2f} points"
            + (" (below the 5-point target: distillation effects are hard to see)." if gap < 5 else ".")
        )
    for _, r in sub.iterrows():
        if r.method in ("teacher", "baseline"):
            continue
        p = r.get("p_vs_baseline_holm", r.get("p_vs_baseline"))
        if p is None or (isinstance(p, float) and math.isnan(p)):
            out.append(
                f"- {r.method}: {r.get('delta_vs_baseline'):+.2f} vs baseline; no paired test "
                f"(fewer than 2 matched seeds or identical differences)."
            )
            continue
        verdict = "significant" if p < ALPHA else "not significant"
        claim = ""
        paper_gain = r.get("paper_gain")
        if isinstance(paper_gain, float) and not math.isnan(paper_gain) and paper_gain > 0:
            reproduced = r["delta_vs_baseline"] > 0 and p < ALPHA
            claim = f"; the paper reports {paper_gain:+.2f}, " + (
                "a gain that reproduces here in sign."
                if reproduced
                else "a gain that does NOT reproduce here at this significance level."
            )
        out.append(
            f"- {r.method}: {r['delta_vs_baseline']:+.2f} vs baseline (paired p = {_p(r.get('p_vs_baseline'))}, "
            f"Holm-adjusted over {int(r.get('n_comparisons', 1))} comparisons {_p(p)}: {verdict} at α = {ALPHA})"
            f"{claim}"
        )
    return out


def write_table(table: pd.DataFrame, md: str, out_dir: Path, stem: str = "main_table") -> tuple[Path, Path]:
    """Write ``<stem>.csv`` and ``<stem>.md`` atomically (a temp file each, then rename)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    tmp_csv, tmp_md = csv_path.with_suffix(".csv.tmp"), md_path.with_suffix(".md.tmp")
    table.to_csv(tmp_csv, index=False, float_format="%.6g")
    tmp_md.write_text(md)
    tmp_csv.replace(csv_path)
    tmp_md.replace(md_path)
    return csv_path, md_path
