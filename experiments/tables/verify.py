"""``maskd-bench verify-teacher``: retrain a committed table's teacher here and compare it with the shipped record.

A table is built on one teacher run; if another machine trains a different teacher from the same manifest, every
number of the table moves with it (issue 9: 41.84 vs 39.50 mIoU before the CPU kernels were pinned). This command
reads the teacher's run from the table's export (``runs.jsonl``), checks that the shipped manifest still makes that
stage (same ``config_hash``), and trains it again from nothing — pretraining and scenes included, in a throwaway
cache and MLflow store, so nothing on this machine is reused — then compares every metric that is not a duration,
bit for bit. The exit status says whether they are all equal.

Where bit-identity cannot be had (two CPU families whose kernels round differently), ``--seed N`` measures what such
a difference is worth: it trains the same teacher at another seed on this machine and sets its metrics beside the
exported ones — the spread of two teacher seeds. The pretrained backbones (their own ``pretrain.seed``) are not
what it varies; they are reused from this machine's cache where they are there.
"""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..cpu_isa import cpu_kernels
from ..engine.manifest import load_manifest
from ..engine.paths import CACHE_ENV_VAR
from ..engine.pipeline import Pipeline, teacher_hash, with_runtime
from ..engine.runtime import Runtime
from ..engine.tracking import Tracker, parent_tags
from ..engine.training import train_model
from .export import ExportError, read_export

UNTIMED = ("time", "seconds", "_s/")  # durations differ on every machine; everything else must not


@dataclass
class Comparison:
    metric: str
    exported: float
    retrained: float

    @property
    def equal(self) -> bool:
        both_nan = math.isnan(self.exported) and math.isnan(self.retrained)
        return both_nan or self.exported == self.retrained


def timed(name: str) -> bool:
    return any(part in name for part in UNTIMED) or name.endswith("_s")


def exported_teacher(export: Path, task: str):
    """The table's record, its manifest for ``task`` and the exported teacher run (the computed one, not a reuse
    record, whose metrics are copies)."""
    record, runs = read_export(export)
    teachers = [r for r in runs if r.data.tags.get("kind") == "teacher" and r.data.tags.get("task") == task]
    computed = [r for r in teachers if "reused_from" not in r.data.tags] or teachers
    if not computed:
        raise ExportError(f"{export}: no {task} teacher run in this export")
    run = computed[0]
    names = [n for n in record.manifests if load_manifest(n, check_data=False).task == task]
    if not names:
        raise ExportError(f"{export}: the table has no {task} manifest (it has {', '.join(record.manifests)})")
    return record, names[0], run


@contextmanager
def _fresh_cache() -> Iterator[Path]:
    before = os.environ.get(CACHE_ENV_VAR)
    with tempfile.TemporaryDirectory(prefix="maskd-verify-") as tmp:
        os.environ[CACHE_ENV_VAR] = str(Path(tmp) / "cache")
        try:
            yield Path(tmp)
        finally:
            if before is None:
                os.environ.pop(CACHE_ENV_VAR, None)
            else:
                os.environ[CACHE_ENV_VAR] = before


def verify_teacher(export: Path, task: str, progress: bool = True, seed: int = 0) -> tuple[list[Comparison], str]:
    """Retrain ``task``'s teacher of the table exported in ``export`` (at ``seed``: the table's teacher is seed 0);
    returns the comparisons and a line naming where each side was computed."""
    _, manifest_name, run = exported_teacher(export, task)
    m = load_manifest(manifest_name)
    # The export's teacher ran with this many torch threads (part of its hash); the retrain uses as many. Exports
    # from before the tag have the thread-free hash.
    threads = run.data.tags.get("torch_threads")
    if threads is not None:
        torch.set_num_threads(int(threads))
        shipped = with_runtime(teacher_hash(m), Runtime(), int(threads))
    else:
        shipped = teacher_hash(m)
    exported_hash = run.data.tags.get("config_hash")
    if shipped != exported_hash:
        raise ExportError(
            f"{export}: {manifest_name} now makes teacher {shipped}, the export's teacher is {exported_hash} "
            "(the manifest changed since the table; rerun the table)"
        )
    if seed != 0:  # another seed of the same stage: the pipeline knows only the table's teacher (seed 0)
        retrained = train_model(m, "teacher", seed, log=lambda metrics, step: None, progress=progress).metrics
    else:
        with _fresh_cache() as tmp:
            tracker = Tracker(f"sqlite:///{tmp / 'mlflow.db'}")
            pipeline = Pipeline(tracker, progress=progress, reuse=False)
            with tracker.run(f"verify/{task}/teacher", parent_tags("verify", task), {}) as parent:
                outcome = pipeline.teacher(m, parent.info.run_id)
            retrained = tracker.client.get_run(outcome.run_id).data.metrics  # final values, as the export holds
    exported = {k: float(v) for k, v in run.data.metrics.items() if not timed(k)}
    rows = [Comparison(k, v, float(retrained.get(k, math.nan))) for k, v in sorted(exported.items())]
    where = (
        f"exported: {run.data.tags.get('cpu_kernels', 'kernels not recorded')}, torch "
        f"{run.data.tags.get('torch_version', '?')}; retrained here: {cpu_kernels()}"
        + (f", teacher seed {seed} (the table's is 0)" if seed else "")
    )
    return rows, where
