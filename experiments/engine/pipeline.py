"""Runs manifests through the stages with MLflow tracking and reuse by config hash.

A table is one parent run; under it one child run per stage, method and seed. A child whose config hash matches a
FINISHED run of an earlier table is not recomputed: a small child pointing at it (tag ``reused_from``) with its
metrics copied is recorded instead, so every table's parent holds every run the table is built from.
Teachers and tokens are also cached on disk by hash (``cache_root()/checkpoints``), so a fresh MLflow store
re-evaluates a cached teacher instead of retraining it.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Run
from tqdm import tqdm

from . import stages
from ..tables.figures import mask_grid_png
from .manifest import Manifest, digest
from .paths import cache_root
from .tracking import Tracker

#: Bump when a stage's code changes what it computes, so old runs are not reused.
STAGE_VERSION = 1


# ------------------------------------------------------------------------------------------ hashes
def _asdict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def teacher_hash(m: Manifest) -> str:
    return digest(
        {
            "v": STAGE_VERSION,
            "stage": "teacher",
            "task": m.task,
            "data": _asdict(m.data),
            "model": _asdict(m.teacher),
            "train": _asdict(m.teacher_train),
            "seed": 0,
        }
    )


def tokens_hash(m: Manifest) -> str:
    return digest(
        {
            "v": STAGE_VERSION,
            "stage": "tokens",
            "teacher": teacher_hash(m),
            "tokens": _asdict(m.tokens),
            "features": m.features_for("maskd"),
            "seed": 0,
        }
    )


def student_hash(m: Manifest, method: str, seed: int) -> str:
    spec: dict[str, Any] = {
        "v": STAGE_VERSION,
        "stage": "student",
        "task": m.task,
        "data": _asdict(m.data),
        "model": _asdict(m.student),
        "train": _asdict(m.student_train),
        "method": method,
        "seed": seed,
    }
    if method != "baseline":
        spec.update(
            teacher=teacher_hash(m),
            features=m.features_for(method),
            align=m.distill.align,
            cfg=_asdict(getattr(m, method)),
        )
    if method == "maskd":
        spec["tokens"] = (
            tokens_hash(m)
            if m.maskd.masks == "learned"
            else {"num_tokens": m.tokens.num_tokens, "weight_head": m.tokens.weight_head}
        )
    return digest(spec)


def with_amp(config_hash: str, runtime: stages.Runtime) -> str:
    """bf16 runs are different results: their hash differs; float32 hashes are the same on every device."""
    return config_hash if runtime.amp == "none" else digest({"hash": config_hash, "amp": runtime.amp})


# ------------------------------------------------------------------------------------------ running
@dataclass
class StageOutcome:
    run_id: str
    metrics: dict[str, float]
    state_dict: dict[str, torch.Tensor] | None
    reused: bool


class Pipeline:
    """Runs stages under a parent run; ``progress`` shows bars with ETA for every stage."""

    def __init__(
        self, tracker: Tracker, progress: bool = True, reuse: bool = True, runtime: stages.Runtime | None = None
    ) -> None:
        self.tracker = tracker
        self.progress = progress
        self.reuse = reuse
        self.runtime = runtime or stages.Runtime()
        self.checkpoints = cache_root() / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        #: Tags added to every child run and reuse record (e.g. ``ablation``/``variant``), and a run-name prefix.
        self.labels: dict[str, str] = {}
        self.prefix = ""

    def labelled(self, prefix: str = "", **labels: str) -> Pipeline:
        """Set the tags and run-name prefix of the runs that follow (an ablation's variant)."""
        self.labels = {k: str(v) for k, v in labels.items()}
        self.prefix = prefix
        return self

    # ---------------------------------------------------------------------------------------- helpers
    def _logger(self, run_id: str) -> Callable[[dict[str, float], int], None]:
        return lambda values, step: self.tracker.log_metrics(run_id, values, step)

    def _save_checkpoint(self, state: dict[str, torch.Tensor], config_hash: str, name: str) -> Path:
        path = self.checkpoints / f"{name}-{config_hash}.pt"
        tmp = path.with_suffix(".pt.tmp")
        torch.save(state, tmp)
        tmp.replace(path)
        return path

    def _checkpoint(self, run: Run | None, config_hash: str, name: str) -> dict[str, torch.Tensor] | None:
        """The cached checkpoint of ``name``/``config_hash``, from disk or the run's artifacts; None if neither."""
        path = self.checkpoints / f"{name}-{config_hash}.pt"
        if not path.is_file() and run is not None:
            try:
                downloaded = self.tracker.download(run.info.run_id, f"checkpoint/{name}.pt")
                downloaded.replace(path)
            except Exception:  # artifact missing or store moved: the stage is recomputed
                return None
        if not path.is_file():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)

    def _common_tags(self, m: Manifest, kind: str, method: str, seed: int, config_hash: str) -> dict[str, str]:
        return {
            "kind": kind,
            "task": m.task,
            "method": method,
            "seed": str(seed),
            "config_hash": config_hash,
            "manifest": m.name,
            "stage_version": str(STAGE_VERSION),
            "device": self.runtime.device,
            "amp": self.runtime.amp,
            **self.labels,
        }

    def _log_manifest(self, run_id: str, m: Manifest) -> None:
        self.tracker.client.log_dict(run_id, m.to_dict(), "manifest.json")

    def _reused(
        self, kind: str, config_hash: str, run_name: str, parent_id: str, checkpoint: str | None = None
    ) -> StageOutcome | None:
        """A reuse record under ``parent_id`` for a finished run of ``kind`` with ``config_hash`` (and, if the stage
        hands a checkpoint on, that checkpoint); None when the stage must run."""
        found = self.tracker.find_finished(config_hash, kind) if self.reuse else None
        if found is None:
            return None
        state = self._checkpoint(found, config_hash, checkpoint) if checkpoint else None
        if checkpoint and state is None:
            return None
        rid = self.tracker.record_reuse(found, self.prefix + run_name, parent_id, self.labels)
        return StageOutcome(rid, dict(found.data.metrics), state, True)

    # ---------------------------------------------------------------------------------------- stages
    def teacher(self, m: Manifest, parent_id: str) -> StageOutcome:
        h = with_amp(teacher_hash(m), self.runtime)
        tags = self._common_tags(m, "teacher", "teacher", 0, h)
        reused = self._reused("teacher", h, f"{m.task}/teacher", parent_id, checkpoint="teacher")
        if reused is not None:
            return reused
        cached = self._checkpoint(None, h, "teacher") if self.reuse else None
        with self.tracker.run(self.prefix + f"{m.task}/teacher", tags, m.flat(), parent_id) as active:
            rid = active.info.run_id
            self._log_manifest(rid, m)
            with stages.use_runtime(self.runtime):
                if cached is not None:  # the store is new but the checkpoint survived: evaluate, do not retrain
                    self.tracker.client.set_tag(rid, "from_cache", "true")
                    result = stages.evaluate_state(m, "teacher", cached, self.progress)
                else:
                    result = stages.train_teacher(m, "teacher", 0, self._logger(rid), self.progress)
            path = self._save_checkpoint(result.state_dict, h, "teacher")
            self._log_artifact_as(rid, path, "checkpoint", "teacher.pt")
            self.tracker.log_metrics(rid, result.metrics)
        return StageOutcome(rid, result.metrics, result.state_dict, False)

    def tokens(self, m: Manifest, teacher_state: dict[str, torch.Tensor], parent_id: str) -> StageOutcome:
        h = with_amp(tokens_hash(m), self.runtime)
        tags = self._common_tags(m, "tokens", "maskd", 0, h)
        reused = self._reused("tokens", h, f"{m.task}/tokens", parent_id, checkpoint="tokens")
        if reused is not None:
            return reused
        with self.tracker.run(self.prefix + f"{m.task}/tokens", tags, m.flat(), parent_id) as active:
            rid = active.info.run_id
            self._log_manifest(rid, m)
            with stages.use_runtime(self.runtime):
                result = stages.learn_tokens(m, teacher_state, 0, self._logger(rid), self.progress)
                path = self._save_checkpoint(result.state_dict, h, "tokens")
                self._log_artifact_as(rid, path, "checkpoint", "tokens.pt")
                self.tracker.log_metrics(rid, result.metrics)
                teacher = stages.freeze(stages.load_model(m, "teacher", teacher_state))
                learner = stages.build_mask_learner(m)
                learner.load_state_dict(result.state_dict)
                _, val_set, _ = stages.datasets(m)
                self._log_masks(rid, stages.example_masks(m, teacher, learner, val_set), m)
        return StageOutcome(rid, result.metrics, result.state_dict, False)

    def student(self, m: Manifest, method: str, seed: int, teacher_state, token_state, parent_id: str) -> StageOutcome:
        h = with_amp(student_hash(m, method, seed), self.runtime)
        tags = self._common_tags(m, "student", method, seed, h)
        reused = self._reused("student", h, f"{m.task}/{method}/s{seed}", parent_id)
        if reused is not None:
            return reused
        with self.tracker.run(self.prefix + f"{m.task}/{method}/s{seed}", tags, m.flat(), parent_id) as active:
            rid = active.info.run_id
            self._log_manifest(rid, m)
            with stages.use_runtime(self.runtime):
                result = stages.train_student(
                    m, method, seed, teacher_state, token_state, self._logger(rid), self.progress
                )
            self.tracker.log_metrics(rid, result.metrics)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "student.pt"
                torch.save(result.state_dict, path)
                self.tracker.client.log_artifact(rid, str(path), "checkpoint")
            if "masks" in result.extra:
                self._log_masks(rid, result.extra["masks"], m)
        return StageOutcome(rid, result.metrics, None, False)

    def _log_artifact_as(self, run_id: str, path: Path, artifact_dir: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_bytes(path.read_bytes())
            self.tracker.client.log_artifact(run_id, str(target), artifact_dir)

    def _log_masks(self, run_id: str, images_and_masks, m: Manifest) -> None:
        images, masks = images_and_masks
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "masks.png"
            mask_grid_png(images, masks, m.features_for("maskd"), path, title=f"{m.name}: receptive-token masks")
            self.tracker.client.log_artifact(run_id, str(path), "figures")

    # ---------------------------------------------------------------------------------------- manifests
    def run_manifest(
        self,
        m: Manifest,
        parent_id: str,
        methods: list[str] | None = None,
        seeds: list[int] | None = None,
        overall: tqdm | None = None,
    ) -> dict[str, Any]:
        """Teacher, tokens (if MasKD is among the methods) and every method x seed of ``m``."""
        methods = methods or m.methods
        seeds = seeds if seeds is not None else m.protocol.seeds

        def tick(label: str) -> None:
            if overall is not None:
                overall.set_postfix_str(label)
                overall.update(1)

        teacher = self.teacher(m, parent_id)
        tick(f"{m.task}/teacher")
        token_state = None
        if "maskd" in methods and m.maskd.masks == "learned":
            token_state = self.tokens(m, teacher.state_dict, parent_id).state_dict
            tick(f"{m.task}/tokens")
        outcomes = {"teacher": teacher}
        for method in methods:
            for seed in seeds:
                outcomes[f"{method}/s{seed}"] = self.student(
                    m, method, seed, teacher.state_dict, token_state, parent_id
                )
                tick(f"{m.task}/{method}/s{seed}")
        return outcomes


def count_stages(m: Manifest, methods: list[str] | None = None, seeds: list[int] | None = None) -> int:
    methods = methods or m.methods
    seeds = seeds if seeds is not None else m.protocol.seeds
    return 1 + ("maskd" in methods and m.maskd.masks == "learned") + len(methods) * len(seeds)


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    tmp.replace(path)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start
