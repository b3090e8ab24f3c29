"""``nox -s ablations``: MasKD ablations on the embedded benchmark, each a parent run, a table and a plot.

Each ablation changes one knob of a shipped manifest (:data:`ABLATION_NAMES`), trains the MasKD student for every
value and seed (the teacher, and the tokens wherever the knob leaves them unchanged, are reused by config hash),
adds the no-distillation student of the same run length as the reference, and writes from MLflow only
``reports/embedded/ablations/<knob>.{md,csv,png}``. Statistics are those of the main table
(:mod:`experiments.tables.report`): mean, sample std, 95% Student-t interval over seeds, paired differences on matched
seeds with a paired t-test, against the baseline student and against the manifest's own (official) setting.

Run lengths: the students train as long as in the main table (:data:`ABLATION_ITERATIONS` = 300), so each
ablation's official variant and baseline are the main table's runs (reused when the store has them). A first
attempt at 250 iterations left the segmentation students at the background-only floor (7.72 mIoU for every seed),
where no knob can show an effect. Knobs that exist in both tasks run on the cheaper one (segmentation). Each table
says which task and which lengths it used.
"""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..datasets import DEFAULT_KIND
from ..engine.executors import Executor, LocalExecutor, StageGraph
from ..engine.manifest import Manifest, _merge, load_manifest
from ..engine.pipeline import Pipeline, count_stages
from ..engine.tracking import Tracker, parent_tags
from .export import EXPORT_NAME, TableRecord, read_export, write_export
from .report import ALPHA, _fmt, _p, ci95, holm_adjust, on_split, paired, primary_metric, runs_frame, write_table
from .reproduce import TableError, _same, environment_line
from .tuning import choose, loss_weight, tunes

#: Student iterations of the default ablation profile (as the main table).
ABLATION_ITERATIONS = 300
#: Student seeds of the default ablation profile (the main table has five; the issue accepts three here).
ABLATION_SEEDS = [0, 1, 2]
#: Where the default profile takes MasKD's loss weight from: the main table's shipped record, whose equal tuning
#: budget chose a multiplier of the calibrated weight on val (reports/embedded/tuning.md). The ablations vary other
#: knobs around that choice, so they make no weight choice of their own and never look at test to make one.
MAIN_TABLE_EXPORT = Path("reports") / "embedded" / EXPORT_NAME
#: The official FCOS config switches the student masks on after 5000 of ~176k iterations (2.8%).
OFFICIAL_WARMUP_SHARE = 5000 / 176_000


@dataclass(frozen=True)
class Variant:
    label: str  # the knob's value as shown in tables and plots
    overrides: dict[str, Any]  # manifest overrides (nested dict) on top of the profile's
    official: bool = False  # the setting of the official code / the shipped manifest


@dataclass(frozen=True)
class Ablation:
    knob: str  # file stem under reports/embedded/ablations/
    title: str
    manifest: str  # shipped manifest the variants change
    variants: tuple[Variant, ...]
    why: str  # why this task, in the table's protocol note
    base_overrides: dict[str, Any] = field(default_factory=dict)  # the profile's run lengths and MasKD weight
    weight_note: str = ""  # where MasKD's loss weight comes from, in the table's protocol

    def manifests(self) -> list[tuple[Variant, Manifest]]:
        """Every variant's manifest, all resolved and checked before any work starts."""
        return [(v, load_manifest(self.manifest, _merge(self.base_overrides, v.overrides))) for v in self.variants]

    def reference(self) -> Manifest:
        return load_manifest(self.manifest, self.base_overrides)

    def official(self) -> Variant:
        return next(v for v in self.variants if v.official)


PROFILES = ("default", "smoke")
ABLATION_NAMES = (
    "masks",
    "tokens",
    "custom_mask",
    "dice",
    "weight_head",
    "stages_detection",
    "stages_segmentation",
)


def build_ablations(profile: str = "default", multipliers: dict[str, float] | None = None) -> dict[str, Ablation]:
    """The ablations of ``profile``: ``default`` (the committed tables) or ``smoke`` (the same knobs on the
    smoke manifests, seconds per run, meaningless numbers; for tests). ``multipliers`` (manifest name -> multiplier
    of MasKD's calibrated weight) default to the main table's val choices for ``default``, to 1 for ``smoke``."""
    if profile not in PROFILES:
        raise ValueError(f"profile {profile!r} is not one of {', '.join(PROFILES)}")
    det = "embedded_detection" if profile == "default" else "embedded_detection_smoke"
    seg = "embedded_segmentation" if profile == "default" else "embedded_segmentation_smoke"
    iterations = {
        det: ABLATION_ITERATIONS if profile == "default" else load_manifest(det).student_train.iterations,
        seg: ABLATION_ITERATIONS if profile == "default" else load_manifest(seg).student_train.iterations,
    }
    det_warmup = max(1, round(OFFICIAL_WARMUP_SHARE * iterations[det]))
    # Three seeds (the main table has five): the ablations' budget. MasKD at the weight the main table chose on val.
    seeds = {"seeds": ABLATION_SEEDS} if profile == "default" else {}
    if multipliers is None:
        multipliers = main_table_multipliers(Path.cwd() / MAIN_TABLE_EXPORT) if profile == "default" else {}
    weights = {name: maskd_weight(name, multipliers.get(name)) for name in (det, seg)}
    base = {
        det: {
            "student_train": {"iterations": iterations[det]},
            "maskd": {"custom_mask_warmup": det_warmup, **weights[det][0]},
            "protocol": seeds,
        },
        seg: {"student_train": {"iterations": iterations[seg]}, "maskd": weights[seg][0], "protocol": seeds},
    }
    seg_why = "segmentation: the knob exists in both tasks and a segmentation student step is ~25% cheaper"

    def ablation(knob, title, manifest, variants, why) -> Ablation:
        return Ablation(knob, title, manifest, tuple(variants), why, base[manifest], weights[manifest][1])

    items = [
        ablation(
            "tokens",
            "Number of receptive tokens T",
            seg,
            [Variant(str(t), {"tokens": {"num_tokens": t}}, official=t == 8) for t in (1, 2, 4, 6, 8, 16)],
            seg_why + "; the official segmentation code uses 8 tokens (detection: 6). T = 1 has no Dice term",
        ),
        ablation(
            "dice",
            "Dice diversity weight in token learning",
            seg,
            [
                Variant(f"{w:g}", {"tokens": {"dice_weight": w}}, official=w == 1.0)
                for w in (0.0, 0.1, 0.5, 1.0, 2.0, 5.0)
            ],
            seg_why + "; the official weight is 1 (hard-wired)",
        ),
        ablation(
            "stages_detection",
            "Distilled FPN levels (detection)",
            det,
            [
                Variant("P3", {"maskd": {"features": ["P3"]}}),
                Variant("P3-P4", {"maskd": {"features": ["P3", "P4"]}}),
                Variant("P3-P5", {"maskd": {"features": ["P3", "P4", "P5"]}}),
                Variant("P3-P7 (all)", {}, official=True),  # the manifest's distill.features: P3-P7
            ],
            "detection (FPN levels exist only there); the tokens are learned anew on the distilled levels only, "
            "the other levels left unmasked in stage 1",
        ),
        ablation(
            "stages_segmentation",
            "Distilled segmentation features: logits, backbone (layer4) or both",
            seg,
            [
                Variant("logits", {}, official=True),  # the manifest's distill.features: the logits
                Variant("backbone", {"maskd": {"features": ["backbone"]}, "distill": {"align": True}}),
                Variant("backbone+logits", {"maskd": {"features": ["backbone", "logits"]}, "distill": {"align": True}}),
            ],
            "segmentation; tokens learned on the distilled features (backbone masks go through the frozen "
            "ASPP head to the CE loss); backbone variants add a trainable 1x1 align conv per feature "
            "(student 128 -> teacher 256 channels), as FitNet's hint",
        ),
        ablation(
            "custom_mask",
            "Student-mask customisation and its warm-up",
            det,
            [
                Variant("off", {"maskd": {"custom_mask": False}}),
                Variant("on, warm-up 0", {"maskd": {"custom_mask": True, "custom_mask_warmup": 0}}),
                Variant(
                    f"on, warm-up {det_warmup} (2.8%)",
                    {"maskd": {"custom_mask": True, "custom_mask_warmup": det_warmup}},
                    official=True,
                ),
            ],
            "detection (the official segmentation code has no customisation); the official FCOS warm-up is "
            "5000 of ~176k iterations, 2.8% of the run",
        ),
        ablation(
            "weight_head",
            "Per-mask weight head",
            det,
            [
                Variant("on", {"tokens": {"weight_head": True}}, official=True),
                Variant("off", {"tokens": {"weight_head": False}}),
            ],
            "detection (the official segmentation loss has no weight head); 'off' also learns its tokens without "
            "the head (equal weights in stage 1)",
        ),
        ablation(
            "masks",
            "Where the masks come from",
            det,
            [
                Variant("learned", {"maskd": {"masks": "learned"}}, official=True),
                Variant("untrained", {"maskd": {"masks": "untrained"}}),
                Variant("uniform", {"maskd": {"masks": "uniform"}}),
                Variant("gt_box", {"maskd": {"masks": "gt_box"}}),
            ],
            "detection (ground-truth boxes exist only there). untrained: the official token init N(0, 0.01^2); "
            "uniform: every mask 0.5 everywhere; gt_box: two fixed masks per level, the union of the "
            "ground-truth boxes and its complement, no weight head, no customisation",
        ),
    ]
    by_knob = {a.knob: a for a in items}
    return {knob: by_knob[knob] for knob in ABLATION_NAMES}  # the order they run in


def main_table_multipliers(export: Path) -> dict[str, float]:
    """Manifest name -> the multiplier of MasKD's calibrated loss weight that the main table's tuning chose on val,
    read from the main table's shipped record (the same choice :func:`experiments.tables.tuning.choose` makes)."""
    if not export.is_file():
        raise TableError(
            f"{export}: the main table's shipped record is missing; the default ablations take MasKD's loss weight "
            "from its val tuning (run `nox -s reproduce_table` first, or check out reports/)"
        )
    record, runs = read_export(export)
    frame = runs_frame(runs)
    out = {}
    for name in record.manifests:
        m = load_manifest(name)
        if tunes(m) and "maskd" in m.methods:
            out[name] = choose(frame, m)["maskd"].multiplier
    return out


def maskd_weight(manifest: str, multiplier: float | None) -> tuple[dict[str, Any], str]:
    """The ``maskd`` overrides that put its loss weight at ``multiplier`` times the calibrated value (none for 1;
    ``None``: no choice was made, the calibrated value), and the protocol's sentence about it."""
    m = load_manifest(manifest)
    calibrated = loss_weight(m, "maskd")
    if multiplier is None:
        return {}, f"MasKD loss weight {calibrated:.3g} (the manifest's calibrated value)"
    chosen = (
        f"×{multiplier:g} of the calibrated {calibrated:.3g}, chosen on val by the main table's tuning, "
        "`reports/embedded/tuning.md`"
    )
    if multiplier == 1.0:
        return {}, f"MasKD loss weight {calibrated:.3g} ({chosen})"
    # the product tuning.scaled forms: the main table's runs are reused
    return {"loss_weight": calibrated * multiplier}, f"MasKD loss weight {calibrated * multiplier:.3g} ({chosen})"


# ------------------------------------------------------------------------------------------ running
def count_ablation_stages(a: Ablation) -> int:
    ref = a.reference()
    n = 1 + len(ref.protocol.seeds)  # teacher and baseline students
    for _, m in a.manifests():
        n += count_stages(m, ["maskd"]) - 1  # tokens (if learned) and students, the teacher counted once
    return n


def ablation_graph(a: Ablation) -> StageGraph:
    """The stages of ``a`` in the order they run locally: teacher, baseline students, then per variant its tokens
    (if learned) and MasKD students; each labelled with the ablation and variant."""
    ref = a.reference()
    graph = StageGraph()
    teacher = graph.teacher(ref, "", ablation=a.knob, variant="teacher")
    for seed in ref.protocol.seeds:
        graph.student(ref, "baseline", seed, None, None, "baseline/", ablation=a.knob, variant="baseline")
    for variant, m in a.manifests():
        labels = {"ablation": a.knob, "variant": variant.label}
        tokens = graph.tokens(m, teacher, f"{variant.label}/", **labels) if m.maskd.masks == "learned" else None
        for seed in m.protocol.seeds:
            graph.student(m, "maskd", seed, teacher, tokens, f"{variant.label}/", **labels)
    return graph


def run_ablation(
    a: Ablation,
    tracker: Tracker,
    pipeline: Pipeline,
    profile: str,
    overall: tqdm | None = None,
    executor: Executor | None = None,
) -> tuple[str, float]:
    """Run (or reuse) every stage of ``a`` under one parent run with ``executor`` (default: in this process);
    returns (parent run id, wall seconds)."""
    variants = a.manifests()
    ref = a.reference()
    start = time.perf_counter()
    tags = parent_tags("ablation", ref.task, ablation=a.knob, profile=profile)
    params = {"manifest": ref.name, "knob": a.knob, **{f"variant.{i}": v.label for i, (v, _) in enumerate(variants)}}
    with tracker.run(f"ablation/{a.knob}" + ("" if profile == "default" else f"/{profile}"), tags, params) as p:
        parent_id = p.info.run_id
        (executor or LocalExecutor()).run(ablation_graph(a), pipeline, parent_id, overall)
        wall = time.perf_counter() - start
        tracker.log_metrics(parent_id, {"wall_time_s": wall})
    return parent_id, wall


# ------------------------------------------------------------------------------------------ tables
def ablation_frame(runs, reference: Manifest | None = None) -> pd.DataFrame:
    """:func:`experiments.tables.report.runs_frame` with each run's ``variant`` tag, its metrics from the split
    ``reference`` reports (test where it has one)."""
    frame = runs_frame(runs)
    if frame.empty:
        return frame
    if reference is not None:
        frame = on_split(frame, [reference])
    variants = {r.info.run_id: r.data.tags.get("variant", "") for r in runs}
    frame["variant"] = frame.run_id.map(variants)
    return frame


def ablation_table(frame: pd.DataFrame, a: Ablation) -> pd.DataFrame:
    """One row per variant (in the ablation's order) after the teacher and the baseline student."""
    ref = a.reference()
    metric = primary_metric(ref.task)
    seeds = ref.protocol.seeds
    official = a.official().label
    students = frame[frame.kind == "student"].assign(method=lambda f: f.variant)
    expected = {"teacher": 1, "baseline": len(seeds), **{v.label: len(seeds) for v in a.variants}}
    rows = []
    for label, n_expected in expected.items():
        sub = frame[frame.variant == label]
        if len(sub) != n_expected:
            raise TableError(f"ablation {a.knob}/{label}: {len(sub)} runs in MLflow, expected {n_expected}")
        values = sub[metric].to_numpy(float)
        if not np.all(np.isfinite(values)):
            raise TableError(f"ablation {a.knob}/{label}: non-finite {metric} {values.tolist()}")
        mean, half = float(np.mean(values)), ci95(values)
        row = {
            "knob": a.knob,
            "task": ref.task,
            "variant": label,
            "official": label == official,
            "metric": metric,
            "mean": mean,
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else math.nan,
            "n_seeds": len(values),
            "ci95": half,
            "ci95_low": mean - half,
            "ci95_high": mean + half,
        }
        if label not in ("teacher", "baseline"):
            vs_base = paired(students, metric, label, "baseline")
            row["paired_diff_vs_baseline"], row["p_vs_baseline"] = vs_base.diff, vs_base.p_value
            if label != official:
                vs_off = paired(students, metric, label, official)
                row["paired_diff_vs_official"], row["p_vs_official"] = vs_off.diff, vs_off.p_value
        if label != "teacher" and "step_time_s" in sub:
            row["step_time_s"] = float(sub["step_time_s"].mean())
        if "added_params" in sub:
            row["added_params"] = float(sub["added_params"].mean())
        rows.append(row)
    holm_adjust(rows, ["p_vs_baseline", "p_vs_official"])  # across every comparison of this table
    return pd.DataFrame(rows)


def compute_seconds(tracker: Tracker, children) -> float:
    """Seconds of computation behind an ablation: the durations of the runs it is built from (for a reuse record,
    the run it points to), teacher excluded (it is the main table's, trained once)."""
    total = 0.0
    for run in children:
        if run.data.tags.get("kind") not in ("tokens", "student"):
            continue
        source = run.data.tags.get("reused_from")
        info = tracker.client.get_run(source).info if source else run.info
        if info.end_time and info.start_time:
            total += (info.end_time - info.start_time) / 1000
    return total


def ablation_markdown(
    table: pd.DataFrame,
    a: Ablation,
    wall: float,
    parent_id: str,
    profile: str,
    environment: str,
    compute: float = math.nan,
) -> str:
    ref = a.reference()
    metric = primary_metric(ref.task)
    official = a.official().label
    lines = [
        f"# Ablation: {a.title} ({ref.task}, embedded benchmark)",
        "",
        f"Generated by `nox -s ablations` (`maskd-bench ablations --only {a.knob}`), MLflow parent run "
        f"`{parent_id}` (profile `{profile}`); rebuilt by `nox -s tables` from the shipped record of its runs, "
        f"`{a.knob}.{EXPORT_NAME}`. Nothing here is edited by hand. Metrics on the {_validation_set(ref)}.",
        "",
        f"| {a.knob} | {metric} mean ± std | ci95 (±) | 95% interval | n | Δ vs baseline (p; Holm p) "
        f"| Δ vs official `{official}` (p; Holm p) | step time s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.itertuples():
        name = f"**{r.variant}** (official)" if r.official else r.variant
        lines.append(
            f"| {name} | {_fmt(r.mean)} ± {_fmt(r.std)} | {_fmt(r.ci95)} | [{_fmt(r.ci95_low)}, {_fmt(r.ci95_high)}] "
            f"| {r.n_seeds} | {_delta(r, 'baseline')} | {_delta(r, 'official')} "
            f"| {_fmt(getattr(r, 'step_time_s', math.nan), 3)} |"
        )
    n_comparisons = int(table["n_comparisons"].iloc[0]) if "n_comparisons" in table and len(table) else 0
    lines += [
        "",
        "**Findings** (paired t-test on matched seeds, two-sided; a difference is called significant when its "
        f"Holm-adjusted p-value, over the {n_comparisons} comparisons of this table, is below α = {ALPHA}):",
        "",
    ]
    lines += [f"- {s}" for s in ablation_findings(table, official)]
    t = ref.student_train
    tok = ref.tokens
    main_length = load_manifest(a.manifest).student_train.iterations
    lines += [
        "",
        "**Protocol.** "
        f"Task: {a.why}. Manifest `{ref.name}` with only the knob changed; every variant and the baseline use "
        f"the same student recipe: {t.iterations} iterations at batch {t.batch_size} ({t.optimizer} lr {t.lr:g}, "
        f"{t.schedule}; main table: {main_length}), seeds {ref.protocol.seeds}, the last checkpoint evaluated on "
        f"the {_validation_set(ref)} (no selection; every choice behind the table was made on val). "
        f"{a.weight_note or 'MasKD at the manifest weight'}. Teacher: one run of the manifest's teacher stage "
        "(seed 0, its metric in the first row; the main table's run where both were trained in one store), its "
        "variance not in the intervals. Tokens: "
        f"{tok.iterations} iterations of stage 1 per token setting (seed 0, one run each, their variance not in the "
        "intervals), reused where the knob does not change them. The interval is the Student-t 95% interval of "
        f"the mean over seeds; with {len(ref.protocol.seeds)} seeds it is wide, and a difference smaller than it is "
        "not evidence either way.",
        "",
        f"Computation behind this table: {compute / 60:.1f} min (the durations of its token and student runs, "
        f"wherever they were first computed; the teacher not counted). Wall time of the call that wrote "
        f"it: {wall / 60:.1f} min (reused runs count only their look-up). {environment}.",
        "",
        f"![{a.knob}]({a.knob}.png)",
        "",
    ]
    return "\n".join(lines)


def _delta(row, against: str) -> str:
    diff = getattr(row, f"paired_diff_vs_{against}", math.nan)
    p = getattr(row, f"p_vs_{against}", math.nan)
    holm = getattr(row, f"p_vs_{against}_holm", math.nan)
    if isinstance(diff, float) and math.isnan(diff):
        return "–"
    return f"{diff:+.2f} (p {_p(p)}; {_p(holm)})"


def _significant(row, against: str) -> bool:
    """Holm-adjusted p below α (:func:`ablation_table` adjusts every comparison)."""
    p = getattr(row, f"p_vs_{against}_holm", math.nan)
    return isinstance(p, float) and not math.isnan(p) and p < ALPHA


def ablation_findings(table: pd.DataFrame, official: str) -> list[str]:
    out = []
    for r in table.itertuples():
        if r.variant in ("teacher", "baseline"):
            continue
        text = f"`{r.variant}`: {r.paired_diff_vs_baseline:+.2f} vs the baseline student, " + (
            "significant" if _significant(r, "baseline") else "**not significant**"
        )
        if r.variant != official:
            text += f"; {r.paired_diff_vs_official:+.2f} vs the official `{official}`, " + (
                "significant" if _significant(r, "official") else "**not significant**"
            )
        out.append(text + ".")
    return out


def ablation_plot(table: pd.DataFrame, a: Ablation, path: Path) -> Path:
    """Metric against the knob, 95% intervals as error bars, the baseline student as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = table[~table.variant.isin(["teacher", "baseline"])]
    base = table[table.variant == "baseline"].iloc[0]
    teacher = table[table.variant == "teacher"].iloc[0]
    metric = str(base.metric)
    x = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 3.0, 3.6))
    ax.axhspan(base.ci95_low, base.ci95_high, color="0.85", label="baseline student (no KD), 95% CI")
    ax.axhline(base["mean"], color="0.5", lw=1)
    yerr = np.nan_to_num(rows.ci95.to_numpy(float))
    colors = ["tab:red" if o else "tab:blue" for o in rows.official]
    ax.errorbar(x, rows["mean"], yerr=yerr, fmt="none", ecolor="k", capsize=4, lw=1)
    ax.scatter(x, rows["mean"], c=colors, zorder=3)
    ax.set_xticks(x, rows.variant, rotation=15 if len(rows) > 4 else 0)
    ax.set_xlabel(a.knob + "  (red: official setting)")
    ax.set_ylabel(f"{metric} (mean over {int(base.n_seeds)} seeds)")
    ax.set_title(f"{a.title}\n{rows.task.iloc[0]}; teacher {teacher['mean']:.1f} {metric}", fontsize=10)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
    return path


def default_out_dir(profile: str) -> Path:
    # relative to where the command runs (nox runs from the repository root), never into an installed package's tree
    base = Path.cwd() / "reports" / "embedded" / "ablations"
    return base if profile == "default" else base / profile


def run_ablations(
    names: list[str] | None = None,
    profile: str = "default",
    tracking_uri: str | None = None,
    out_dir: Path | None = None,
    progress: bool = True,
    reuse: bool = True,
    report: Callable[[str], None] = print,
    runtime=None,
    executor: Executor | None = None,
) -> list[tuple[str, Path, Path, Path, float]]:
    """Run the named ablations (all by default) and write each one's table and plot as soon as it is done."""
    table = build_ablations(profile)
    names = list(names or table)
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"unknown ablation {unknown[0]!r}; known: {', '.join(table)}")
    chosen = [table[n] for n in names]
    for a in chosen:  # every manifest resolved and checked before any work
        a.manifests()
    out_dir = out_dir or default_out_dir(profile)
    tracker = Tracker(tracking_uri)
    tracker.fail_stale_runs()
    pipeline = Pipeline(tracker, progress=progress, reuse=reuse, runtime=runtime)
    done = []
    total = sum(count_ablation_stages(a) for a in chosen)
    multipliers = {a.manifest: multiplier_of(a) for a in table.values()}  # both tasks', into every record
    with tqdm(total=total, desc=f"ablations[{profile}]", unit="run", disable=not progress) as overall:
        for a in chosen:
            parent_id, wall = run_ablation(a, tracker, pipeline, profile, overall, executor)
            children = [r for r in tracker.children(parent_id) if r.info.status == "FINISHED"]
            record = TableRecord(
                profile=profile,
                manifests=[a.manifest],
                environment=environment_line(executor),
                wall_time_s=wall,
                parent_run_id=parent_id,
                extra={"knob": a.knob, "compute_s": compute_seconds(tracker, children), "multipliers": multipliers},
            )
            # the table is computed from the export just written, exactly as `nox -s tables` rebuilds it
            export = write_export(export_path(out_dir, a.knob), record, children)
            csv_path, md_path, png = write_ablation_table(export)
            for path in (csv_path, md_path, png):
                tracker.client.log_artifact(parent_id, str(path), "table")
            report(f"{a.knob}: {wall / 60:.1f} min -> {md_path}")
            done.append((a.knob, csv_path, md_path, png, wall))
    return done


def multiplier_of(a: Ablation) -> float:
    """The multiplier of MasKD's calibrated weight that ``a``'s runs use."""
    return a.reference().maskd.loss_weight / load_manifest(a.manifest).maskd.loss_weight


def export_path(out_dir: Path, knob: str) -> Path:
    """``<knob>.runs.jsonl``: the shipped record of one ablation's runs, beside its table."""
    return out_dir / f"{knob}.{EXPORT_NAME}"


def _ablation_outputs(export: Path, out_dir: Path) -> list[Path]:
    record, runs = read_export(export)
    knob = record.extra.get("knob")
    table = build_ablations(record.profile, record.extra.get("multipliers"))
    if knob not in table:
        raise TableError(f"{export}: ablation {knob!r} is not one of {', '.join(table)}")
    a = table[knob]
    frame = ablation_frame([r for r in runs if r.info.status == "FINISHED"], a.reference())
    tab = ablation_table(frame, a)
    md = ablation_markdown(
        tab, a, record.wall_time_s or math.nan, record.parent_run_id, record.profile, record.environment,
        float(record.extra.get("compute_s", math.nan)),
    )  # fmt: skip
    csv_path, md_path = write_table(tab, md, out_dir, stem=knob)
    return [csv_path, md_path, ablation_plot(tab, a, out_dir / f"{knob}.png")]


def write_ablation_table(export: Path, check: bool = False) -> list[Path]:
    """``<knob>.md``, ``.csv`` and ``.png`` beside ``export`` from the export alone (no store, no training). With
    ``check`` nothing is written: the paths of the committed files that differ are returned."""
    if not check:
        return _ablation_outputs(export, export.parent)
    with tempfile.TemporaryDirectory() as tmp:
        fresh = _ablation_outputs(export, Path(tmp))
        return [export.parent / f.name for f in fresh if not _same(export.parent / f.name, f)]


def _validation_set(m: Manifest) -> str:
    """What the ablation's metric is computed on, in words."""
    if m.data.kind == DEFAULT_KIND:
        if m.protocol.eval_split == "test":
            return f"{m.data.num_test} test scenes"
        return f"{m.data.num_val} validation scenes"
    limit = getattr(m.data, "limit_val", 0)
    return f"first {limit} validation images of {m.data.root}" if limit else f"validation images of {m.data.root}"
