"""The equal tuning budget: every distillation method gets the same grid of loss-weight multipliers, chosen on val.

A method's loss weight is its plug-in's ``weight_knob`` (CWD's ``loss_weight``, FGD's ``weight_scale``, MGD's
``alpha_mgd``...) as calibrated in the manifest. One rule for every method cannot treat them all fairly (a
summed loss on an untrained student is cut harder than an averaged one), so each method gets the same budget
instead: its calibrated weight times each multiplier of ``protocol.weight_grid`` (e.g. ×{0.25, 1, 4}), one
student run each at ``protocol.tune_seed``, and the multiplier with the best primary metric **on val** wins
(a tie goes to the multiplier nearest 1, the calibrated value). The main table then trains every seed at the
chosen weight and reports the split of ``protocol.eval_split`` (test). The tuning run at the chosen weight is
the same stage as the table's run of that seed, so it is reused, not retrained.

Tuning runs carry the tags ``tuning = "true"`` and ``weight_multiplier``; the table's students carry
``weight_multiplier`` too, so a table rebuilt from its export alone can check that it reports the chosen weights.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import pandas as pd

from ..engine.executors import StageGraph
from ..engine.manifest import Manifest
from ..engine.pipeline import needs_tokens
from ..methods import registry as method_registry
from ..tasks import get_task

TUNING_TAG = "tuning"
MULTIPLIER_TAG = "weight_multiplier"
TUNING_PREFIX = "tune/"


class TuningError(RuntimeError):
    """The tuning runs behind a table are missing or do not match the weights the table reports."""


def label(multiplier: float) -> str:
    """``0.25`` -> ``"0.25"``, ``1.0`` -> ``"1"``: the tag value and the run-name part of a multiplier."""
    return f"{multiplier:g}"


def weight_knob(method: str) -> str:
    return method_registry.get(method).weight_knob


def loss_weight(m: Manifest, method: str) -> float:
    """The method's calibrated loss weight in ``m`` (the value its ``weight_knob`` holds)."""
    return float(getattr(getattr(m, method), weight_knob(method)))


def scaled(m: Manifest, method: str, multiplier: float) -> Manifest:
    """``m`` with ``method``'s loss weight times ``multiplier`` (``m`` itself for 1)."""
    if multiplier == 1.0:
        return m
    config = getattr(m, method)
    knob = weight_knob(method)
    changed = dataclasses.replace(config, **{knob: getattr(config, knob) * multiplier})
    return dataclasses.replace(m, method_configs={**m.method_configs, method: changed})


def distillation_methods(m: Manifest) -> list[str]:
    return [method for method in m.methods if method != "baseline"]


def tunes(m: Manifest) -> bool:
    return len(m.protocol.weight_grid) > 1 and bool(distillation_methods(m))


def add_tuning(graph: StageGraph, m: Manifest) -> None:
    """Teacher, tokens and one student per distillation method x multiplier at ``protocol.tune_seed`` (run names
    ``tune/...``, tagged ``tuning = "true"``)."""
    # the teacher and tokens are labelled too: the table's own (reused) teacher and tokens are counted once
    tagged = {TUNING_TAG: "true"}
    teacher = graph.teacher(m, TUNING_PREFIX, **tagged)
    tokens = graph.tokens(m, teacher, TUNING_PREFIX, **tagged) if needs_tokens(m, distillation_methods(m)) else None
    for method in distillation_methods(m):
        for multiplier in m.protocol.weight_grid:
            graph.student(
                scaled(m, method, multiplier), method, m.protocol.tune_seed, teacher, tokens,
                f"{TUNING_PREFIX}x{label(multiplier)}/", **{TUNING_TAG: "true", MULTIPLIER_TAG: label(multiplier)},
            )  # fmt: skip


def add_main(graph: StageGraph, m: Manifest, multipliers: dict[str, float]) -> None:
    """The table's stages: teacher, tokens, the baseline and every method at its chosen multiplier, every seed."""
    # A stage the tuning phase ran is reused here, and a reuse record copies its source's tags: "false" marks the
    # record as the table's own (the tuning run itself stays "true"), so each is counted once on either side.
    mine = {TUNING_TAG: "false"}
    teacher = graph.teacher(m, **mine)
    tokens = graph.tokens(m, teacher, **mine) if needs_tokens(m, m.methods) else None
    for method in m.methods:
        multiplier = multipliers.get(method, 1.0)
        labels = mine if method == "baseline" else {**mine, MULTIPLIER_TAG: label(multiplier)}
        for seed in m.protocol.seeds:
            graph.student(scaled(m, method, multiplier), method, seed, teacher, tokens, **labels)


@dataclass(frozen=True)
class Choice:
    """One method's tuning: the val metric of each multiplier and the one chosen."""

    task: str
    method: str
    knob: str
    calibrated: float  # the manifest's weight (multiplier 1)
    metric: str
    val: dict[float, float]  # multiplier -> val metric of the tuning run
    multiplier: float

    @property
    def weight(self) -> float:
        return self.calibrated * self.multiplier


def choose_multiplier(val: dict[float, float]) -> float:
    """The best val metric; among equals, the multiplier nearest 1 (in log scale), then the smaller one."""
    return max(val, key=lambda g: (val[g], -abs(math.log(g)), -g))


def tuning_rows(frame: pd.DataFrame) -> pd.DataFrame:
    if frame.empty or TUNING_TAG not in frame:
        return frame.iloc[0:0]
    return frame[frame[TUNING_TAG] == "true"]


def table_rows(frame: pd.DataFrame) -> pd.DataFrame:
    """The runs a table reports: everything but the tuning runs."""
    if frame.empty or TUNING_TAG not in frame:
        return frame
    return frame[frame[TUNING_TAG] != "true"]


def choose(frame: pd.DataFrame, m: Manifest) -> dict[str, Choice]:
    """Each distillation method's choice from the FINISHED tuning runs of ``m``'s task in ``frame`` (val metric,
    never test). Raises :class:`TuningError` if a multiplier of the grid has no run or a non-finite metric."""
    metric = get_task(m.task).primary_metric
    rows = tuning_rows(frame)
    rows = rows[(rows.task == m.task) & (rows.status == "FINISHED")] if not rows.empty else rows
    out = {}
    for method in distillation_methods(m):
        mine = rows[rows.method == method] if not rows.empty else rows
        val = {}
        for multiplier in m.protocol.weight_grid:
            hit = mine[mine[MULTIPLIER_TAG] == label(multiplier)] if not mine.empty else mine
            values = hit[metric].to_numpy(float) if not hit.empty else []
            if len(values) != 1 or not math.isfinite(values[0]):
                raise TuningError(
                    f"{m.task}/{method} x{label(multiplier)}: {len(values)} finished tuning runs with a finite "
                    f"val {metric}, expected 1"
                )
            val[multiplier] = float(values[0])
        chosen = choose_multiplier(val)
        out[method] = Choice(m.task, method, weight_knob(method), loss_weight(m, method), metric, val, chosen)
    return out


def check_reported(frame: pd.DataFrame, m: Manifest, choices: dict[str, Choice]) -> None:
    """Every student the table reports ran at its method's chosen multiplier."""
    rows = table_rows(frame)
    for method, choice in choices.items():
        mine = rows[(rows.task == m.task) & (rows.method == method)]
        found = set(mine[MULTIPLIER_TAG]) if MULTIPLIER_TAG in mine else set()
        if found != {label(choice.multiplier)}:
            raise TuningError(
                f"{m.task}/{method}: the table's runs have weight multipliers {sorted(found)}, but the val "
                f"tuning chose x{label(choice.multiplier)}"
            )


def tuning_table(choices: list[Choice]) -> pd.DataFrame:
    """One row per task x method x multiplier: the val metric behind each choice."""
    rows = []
    for c in choices:
        for multiplier, value in sorted(c.val.items()):
            rows.append(
                {
                    "task": c.task,
                    "method": c.method,
                    "split": "val",
                    "metric": c.metric,
                    "loss_weight_knob": c.knob,
                    "weight_multiplier": multiplier,
                    "loss_weight": c.calibrated * multiplier,
                    "value": value,
                    "chosen": multiplier == c.multiplier,
                }
            )
    return pd.DataFrame(rows)


def tuning_markdown(choices: list[Choice], manifests: list[Manifest], parent_run_id: str) -> str:
    lines = [
        "# Embedded benchmark: loss-weight tuning (val split)",
        "",
        f"Generated from the shipped export of the main table (parent run `{parent_run_id}`); do not edit.",
        "",
        "Every distillation method gets the same budget: its calibrated loss weight times each multiplier of "
        "`protocol.weight_grid`, one student run at `protocol.tune_seed`, chosen by the primary metric on the "
        "**val** split (a tie goes to the multiplier nearest 1). The main table trains every seed at the chosen "
        "weight and reports test.",
        "",
    ]
    for m in manifests:
        mine = [c for c in choices if c.task == m.task]
        if not mine:
            continue
        grid = m.protocol.weight_grid
        lines += [
            f"## {m.task.capitalize()} (val {mine[0].metric}, seed {m.protocol.tune_seed})",
            "",
            "| method | knob | calibrated | " + " | ".join(f"×{label(g)}" for g in grid) + " | chosen | weight |",
            "|" + "---|" * (len(grid) + 5),
        ]
        for c in mine:
            cells = [f"**{c.val[g]:.2f}**" if g == c.multiplier else f"{c.val[g]:.2f}" for g in grid]
            lines.append(
                f"| {c.method} | `{c.knob}` | {c.calibrated:.3g} | "
                + " | ".join(cells)
                + f" | ×{label(c.multiplier)} | {c.weight:.3g} |"
            )
        lines.append("")
    return "\n".join(lines)


def protocol_line(choices: list[Choice], m: Manifest) -> str:
    """One sentence for the main table's protocol: the grid and the val results behind each choice."""
    mine = [c for c in choices if c.task == m.task]
    if not mine:
        return ""
    parts = [
        f"{c.method} ×{label(c.multiplier)} ("
        + ", ".join(f"×{label(g)}: {v:.2f}" for g, v in sorted(c.val.items()))
        + ")"
        for c in mine
    ]
    return (
        f"- **{m.task} loss weights**: each method's calibrated weight × {[float(g) for g in m.protocol.weight_grid]}"
        f", one run at seed {m.protocol.tune_seed}, chosen on val {mine[0].metric}: " + "; ".join(parts) + "."
    )
