"""Runs manifests through the stages with MLflow tracking and reuse by config hash.

A table is one parent run; under it one child run per stage, method and seed. A child whose config hash matches a
FINISHED run of an earlier table is not recomputed: a small child pointing at it (tag ``reused_from``) with its
metrics copied is recorded instead, so every table's parent holds every run the table is built from.
Teachers and tokens are also cached on disk by hash (``cache_root()/checkpoints``), so a fresh MLflow store
re-evaluates a cached teacher instead of retraining it.

A run is reused when both its ``config_hash`` (the stage's config, upstream stages' configs included) and its
``code_fingerprint`` (the normalised source of the code that computes it, :mod:`.fingerprint`) match. A run of the
same config computed by other code is reused only with ``reuse_stale`` (``--reuse-stale``); such reuses are
listed in :data:`STALE_REUSED`. Checkpoints are written atomically, carry their sha256 (tag ``checkpoint_sha256``
and a ``.sha256`` file beside them) and are verified before use: a bad one is deleted and fetched again from the
run's artifacts, or the stage is rebuilt. Several processes may share one store and one cache: a stage is
claimed (a lock file per stage key under ``cache_root()/claims``) while it is computed, so the same stage is
computed once and the others wait and reuse it.

A stage that trains writes a resume checkpoint every ``checkpoint_every`` steps (``cache_root()/resume/<kind>-<key>``,
the last two, and the newest as the run's ``resume/last.pt`` artifact). The next claimant of a stage whose run was
abandoned (its process killed or interrupted) continues that same MLflow run from the newest good checkpoint
(``resumed <run> from step N``) instead of marking it FAILED and training from step 0.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from mlflow.entities import Run
from tqdm import tqdm

from .. import methods
from ..cpu_isa import cpu_kernels
from ..tables.figures import mask_grid_png
from ..tasks import get_task
from . import checkpoints as ckpt
from . import stages
from .batches import geometry
from .distributed import leading
from .fingerprint import code_fingerprint
from .locks import claim_timeout, file_lock
from .manifest import Manifest, digest
from .models import without_weight_files
from .paths import cache_root
from .pretrain import pretrain_spec
from .runtime import distributed
from .tokens import token_features
from .tracking import Tracker
from .training import Resume

#: Default of :class:`Pipeline`'s ``reuse_stale`` (the command line sets it from ``--reuse-stale``).
REUSE_STALE = False


@dataclass(frozen=True)
class StaleReuse:
    """A finished run reused although it was computed by other code (``--reuse-stale``)."""

    name: str  # the reuse record's run name, e.g. ``detection/teacher``
    run_id: str  # the reused run
    git_commit: str  # its ``git_commit`` tag
    fingerprint: str  # its ``code_fingerprint`` tag
    current: str  # today's fingerprint

    def line(self) -> str:
        return (
            f"  {self.name:24s} run {self.run_id}  git {self.git_commit}  code {self.fingerprint} (now {self.current})"
        )


#: Every stale reuse in this process, in order.
STALE_REUSED: list[StaleReuse] = []


# ------------------------------------------------------------------------------------------ hashes
def _asdict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


def _model_spec(cfg: Any) -> Any:
    """A model config for hashing: with the content (sha256) of every weight file it names, so a replaced file
    is a different stage (the path alone is not)."""
    from .models import hash_spec
    from .weights import weight_file_digests

    spec = hash_spec(cfg)  # the paper-scale fields only when set: embedded hashes stay what they were
    files = weight_file_digests(cfg)
    return {**spec, "weight_files": files} if files else spec


#: Training keys that never change a stage's result: resume is exact, so when checkpoints are written is not hashed;
#: how the batch is laid out over devices enters through :meth:`~.batches.Geometry.hash_part` instead.
UNHASHED_TRAIN_KEYS = ("checkpoint_every", "batch_per_device", "batch_scaling", "sync_bn")


def train_spec(cfg: Any, section: str) -> dict[str, Any]:
    """A training section for hashing: without :data:`UNHASHED_TRAIN_KEYS`, plus the batch geometry in this job
    when it is not one forward of the whole batch (so the hashes of runs from before these keys stand)."""
    spec = {k: v for k, v in _asdict(cfg).items() if k not in UNHASHED_TRAIN_KEYS}
    part = geometry(cfg, section).hash_part()
    return {**spec, "geometry": part} if part is not None else spec


def _data_spec(cfg: Any) -> Any:
    """The data section for hashing, with its kind (left out for the embedded scenes, whose hashes predate
    the kinds)."""
    from ..datasets import DEFAULT_KIND

    # hashed_fields: a kind's config may leave out fields at values that predate them (the scenes' test split)
    spec = cfg.hashed_fields() if hasattr(cfg, "hashed_fields") else _asdict(cfg)
    kind = getattr(cfg, "kind", DEFAULT_KIND)
    return spec if kind == DEFAULT_KIND else {"kind": kind, **spec}


def teacher_hash(m: Manifest) -> str:
    spec: dict[str, Any] = {
        "stage": "teacher",
        "task": m.task,
        "data": _data_spec(m.data),
        "model": _model_spec(m.teacher),
        # a teacher from a file is evaluated, not trained: its training section does not make it
        "train": "weights" if m.teacher.weights else train_spec(m.teacher_train, "teacher_train"),
        "seed": 0,
    }
    pretrained = pretrain_spec(m, "teacher")
    if pretrained is not None:  # only when on, so the hashes of runs from scratch stay what they were
        spec["pretrain"] = pretrained
    return digest(spec)


def tokens_hash(m: Manifest) -> str:
    return digest(
        {
            "stage": "tokens",
            "teacher": teacher_hash(m),
            "tokens": train_spec(m.tokens, "tokens"),
            "features": token_features(m),
            "seed": 0,
        }
    )


def student_hash(m: Manifest, method: str, seed: int) -> str:
    spec: dict[str, Any] = {
        "stage": "student",
        "task": m.task,
        "data": _data_spec(m.data),
        "model": _model_spec(m.student),
        "train": train_spec(m.student_train, "student_train"),
        "method": method,
        "seed": seed,
    }
    pretrained = pretrain_spec(m, "student")  # the teacher's enters through teacher_hash
    if pretrained is not None:  # only when on, so the hashes of runs from scratch stay what they were
        spec["pretrain"] = pretrained
    if method != "baseline":
        plugin = methods.get(method)
        spec.update(
            teacher=teacher_hash(m),
            features=m.features_for(method),
            align=m.distill.align,
            cfg=_asdict(getattr(m, method)),
            **plugin.hash_inputs(m),
        )
        if m.distill.init_from_teacher:  # only when set, so the hashes of existing runs stay what they were
            spec["init_from_teacher"] = list(m.distill.init_from_teacher)
        if m.distill.teacher_cache:  # bitwise the same student, but recorded; only when set, as above
            spec["teacher_cache"] = True
        if plugin.uses_tokens(m):
            spec["tokens"] = tokens_hash(m)
    return digest(spec)


def with_runtime(config_hash: str, runtime: stages.Runtime, threads: int | None = None) -> str:
    """The stage's hash under ``runtime``: bf16/fp16 runs are other results, and so are CPU runs with another
    number of torch threads (``threads``, default: this process's), whose kernels split their sums differently.
    The thread count is what the executors set per stage (``--stage-cpus``, default 1), so a table's numbers do
    not depend on how many cores the machine has; on CUDA it does not enter."""
    spec: dict[str, object] = {"hash": config_hash}
    if runtime.amp != "none":
        spec["amp"] = runtime.amp
    if torch.device(runtime.device).type == "cpu":
        spec["threads"] = threads if threads is not None else torch.get_num_threads()
    return config_hash if len(spec) == 1 else digest(spec)


def stage_fingerprint(m: Manifest, kind: str, method: str | None = None) -> str:
    """The code fingerprint of a stage of ``m`` (its own code and the upstream stages' code it depends on)."""
    return code_fingerprint(kind, m.task, method)


def stage_key(config_hash: str, fingerprint: str) -> str:
    """The stage's full hash, config and code: names its cached checkpoint and its claim."""
    return digest({"config": config_hash, "code": fingerprint})


# ------------------------------------------------------------------------------------------ running
@dataclass(frozen=True)
class Resumable:
    """An abandoned run to continue and the checkpoint (after ``step`` optimizer steps) to continue it from."""

    run_id: str
    state: dict[str, Any]
    step: int


@dataclass
class StageOutcome:
    run_id: str
    metrics: dict[str, float]
    state_dict: dict[str, torch.Tensor] | None
    reused: bool


class Pipeline:
    """Runs stages under a parent run; ``progress`` shows bars with ETA for every stage."""

    def __init__(
        self,
        tracker: Tracker,
        progress: bool = True,
        reuse: bool = True,
        runtime: stages.Runtime | None = None,
        reuse_stale: bool | None = None,
    ) -> None:
        self.tracker = tracker
        self.progress = progress
        self.reuse = reuse
        self.reuse_stale = REUSE_STALE if reuse_stale is None else reuse_stale
        self.runtime = runtime or stages.Runtime()
        self.checkpoints = cache_root() / "checkpoints"
        self.checkpoints.mkdir(parents=True, exist_ok=True)
        self.claims = cache_root() / "claims"
        self.resumes = cache_root() / "resume"
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

    def _save_checkpoint(self, state: dict[str, torch.Tensor], key: str, name: str) -> tuple[Path, str]:
        """Write the cache file atomically (unique temporary file, ``os.replace``); returns it and its sha256."""
        path = self.checkpoints / f"{name}-{key}.pt"
        return path, ckpt.save_atomic(state, path)

    def _checkpoint(
        self, run: Run | None, key: str, name: str, validate: Callable[[dict[str, torch.Tensor]], Any] | None = None
    ) -> dict[str, torch.Tensor] | None:
        """The checkpoint ``name`` of stage ``key``, from the disk cache or else the run's artifacts; None if
        neither holds a good one. A cached file is checked against the sha256 its run recorded (else the one
        written beside it), loaded with ``weights_only=True`` and, with ``validate``, into the model; a bad one is
        deleted (one line on stderr) and fetched again."""
        path = self.checkpoints / f"{name}-{key}.pt"
        expected = run.data.tags.get("checkpoint_sha256") if run is not None else None
        if path.is_file():
            try:
                return self._verified(path, expected, validate)
            except ckpt.CheckpointError as exc:
                ckpt.remove(path)
                then = f"fetching it again from run {run.info.run_id}" if run is not None else "the stage is rebuilt"
                _say(f"cache: deleted {exc}; {then}")
        if run is None:
            return None
        try:
            with self.tracker.downloaded(run.info.run_id, f"checkpoint/{name}.pt") as downloaded:
                state = self._verified(downloaded, expected, validate)
                digest_ = expected or ckpt.sha256_file(downloaded)
                fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=self.checkpoints)
                os.close(fd)
                shutil.copyfile(downloaded, tmp)  # the download may lie on another file system
                os.replace(tmp, path)
                ckpt.write_text_atomic(ckpt.sidecar(path), digest_ + "\n")
                return state
        except ckpt.CheckpointError as exc:
            _say(f"cache: run {run.info.run_id}'s artifact is bad too ({exc}); the stage is rebuilt")
            return None
        except Exception:  # artifact missing or store moved: the stage is recomputed
            return None

    @staticmethod
    def _verified(
        path: Path, expected: str | None, validate: Callable[[dict[str, torch.Tensor]], Any] | None
    ) -> dict[str, torch.Tensor]:
        state = ckpt.load_checked(path, expected)
        if validate is not None:
            try:
                validate(state)
            except (RuntimeError, ValueError, KeyError) as exc:
                reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                raise ckpt.CheckpointError(f"{path}: does not fit the model ({reason})") from None
        return state

    def _common_tags(
        self, m: Manifest, kind: str, method: str, seed: int, config_hash: str, fingerprint: str
    ) -> dict[str, str]:
        return {
            "kind": kind,
            "task": m.task,
            "method": method,
            "seed": str(seed),
            "config_hash": config_hash,
            "code_fingerprint": fingerprint,
            "manifest": m.name,
            "device": self.runtime.device,
            "amp": self.runtime.amp,
            "cpu_kernels": cpu_kernels(),  # the pinned instruction set of the CPU kernels (experiments.cpu_isa)
            "torch_threads": str(torch.get_num_threads()),  # part of a CPU run's hash (with_runtime)
            **self.labels,
        }

    def _log_manifest(self, run_id: str, m: Manifest) -> None:
        self.tracker.client.log_dict(run_id, m.to_dict(), "manifest.json")

    def _reused(
        self,
        kind: str,
        config_hash: str,
        fingerprint: str,
        run_name: str,
        parent_id: str,
        checkpoint: str | None = None,
        validate: Callable[[dict[str, torch.Tensor]], Any] | None = None,
    ) -> StageOutcome | None:
        """A reuse record under ``parent_id`` for a finished run of ``kind`` with ``config_hash`` and
        ``fingerprint`` (any fingerprint with ``reuse_stale``) and, if the stage hands a checkpoint on, that
        checkpoint; None when the stage must run."""
        if not self.reuse:
            return None
        found = self.tracker.find_finished(config_hash, kind, fingerprint)
        stale = False
        if found is None and self.reuse_stale:
            found = self.tracker.find_finished(config_hash, kind)
            stale = found is not None
        if found is None:
            return None
        state = None
        if checkpoint:
            key = stage_key(config_hash, found.data.tags.get("code_fingerprint", fingerprint))
            state = self._checkpoint(found, key, checkpoint, validate)
            if state is None:
                return None
        labels = {**self.labels, "reused_stale": "true"} if stale else self.labels
        rid = self.tracker.record_reuse(found, self.prefix + run_name, parent_id, labels)
        if stale:
            STALE_REUSED.append(
                StaleReuse(
                    self.prefix + run_name,
                    found.info.run_id,
                    found.data.tags.get("git_commit", "unknown"),
                    found.data.tags.get("code_fingerprint", "none"),
                    fingerprint,
                )
            )
        return StageOutcome(rid, dict(found.data.metrics), state, True)

    def _claim(self, kind: str, key: str, run_name: str):
        """Hold stage ``key``'s claim while computing it: other processes on this cache wait, then reuse."""
        return file_lock(
            self.claims / f"{kind}-{key}.lock",
            timeout=claim_timeout(),
            waiting=f"waiting: {self.prefix + run_name} is being computed by another process",
        )

    # ---------------------------------------------------------------------------------------- stages
    def teacher(self, m: Manifest, parent_id: str) -> StageOutcome:
        h = with_runtime(teacher_hash(m), self.runtime)
        fp = stage_fingerprint(m, "teacher")
        key = stage_key(h, fp)
        tags = self._common_tags(m, "teacher", "teacher", 0, h, fp)
        name = f"{m.task}/teacher"

        def validate(state: dict[str, torch.Tensor]) -> None:
            get_task(m.task).build_model(without_weight_files(m.teacher)).load_state_dict(state, strict=True)

        args = ("teacher", h, fp, name, parent_id, "teacher", validate)
        reused = self._reused(*args)
        if reused is not None:
            return reused
        with self._claim("teacher", key, name):
            reused = self._reused(*args)  # computed by another process while this one waited
            if reused is not None:
                return reused
            cached = self._checkpoint(None, key, "teacher", validate) if self.reuse else None
            resumed = self._resumable("teacher", key, h, fp) if cached is None else None
            self.tracker.fail_abandoned(h, "teacher", fp, keep=resumed and resumed.run_id)
            section = (m.teacher_train, "teacher_train")
            with self._stage_run("teacher", key, name, tags, m, parent_id, resumed, *section) as (rid, resume):
                with stages.use_runtime(self.runtime):
                    if cached is not None:  # the store is new but the checkpoint survived: evaluate, do not retrain
                        self.tracker.client.set_tag(rid, "from_cache", "true")
                        result = stages.evaluate_state(m, "teacher", cached, self.progress)
                    elif m.teacher.weights:  # a trained teacher from a file: evaluated and logged, not trained
                        self.tracker.client.set_tag(rid, "teacher_source", "weights")
                        self.tracker.client.set_tag(rid, "teacher_weights", m.teacher.weights)
                        state = stages.cpu_state(get_task(m.task).build_model(m.teacher))  # loads the file
                        result = stages.evaluate_state(m, "teacher", state, self.progress)
                    else:
                        result = self._train("train_model", dict(manifest=m, role="teacher", seed=0), rid, resume)
                path, sha = self._save_checkpoint(result.state_dict, key, "teacher")
                self.tracker.client.set_tag(rid, "checkpoint_sha256", sha)
                self._log_artifact_as(rid, path, "checkpoint", "teacher.pt")
                self.tracker.log_metrics(rid, result.metrics)
        return StageOutcome(rid, result.metrics, result.state_dict, False)

    def tokens(self, m: Manifest, teacher_state: dict[str, torch.Tensor], parent_id: str) -> StageOutcome:
        h = with_runtime(tokens_hash(m), self.runtime)
        fp = stage_fingerprint(m, "tokens")
        key = stage_key(h, fp)
        tags = self._common_tags(m, "tokens", "maskd", 0, h, fp)
        name = f"{m.task}/tokens"

        def validate(state: dict[str, torch.Tensor]) -> None:
            stages.build_mask_learner(m).load_state_dict(state, strict=True)

        args = ("tokens", h, fp, name, parent_id, "tokens", validate)
        reused = self._reused(*args)
        if reused is not None:
            return reused
        with self._claim("tokens", key, name):
            reused = self._reused(*args)
            if reused is not None:
                return reused
            resumed = self._resumable("tokens", key, h, fp)
            self.tracker.fail_abandoned(h, "tokens", fp, keep=resumed and resumed.run_id)
            with self._stage_run("tokens", key, name, tags, m, parent_id, resumed, m.tokens, "tokens") as (rid, resume):
                with stages.use_runtime(self.runtime):
                    job = dict(manifest=m, teacher_state=teacher_state, seed=0)
                    result = self._train("learn_tokens", job, rid, resume)
                    path, sha = self._save_checkpoint(result.state_dict, key, "tokens")
                    self.tracker.client.set_tag(rid, "checkpoint_sha256", sha)
                    self._log_artifact_as(rid, path, "checkpoint", "tokens.pt")
                    self.tracker.log_metrics(rid, result.metrics)
                    teacher = stages.freeze(stages.load_model(m, "teacher", teacher_state))
                    learner = stages.build_mask_learner(m)
                    learner.load_state_dict(result.state_dict)
                    _, val_set, _ = get_task(m.task).datasets(m)
                    self._log_masks(rid, stages.example_masks(m, teacher, learner, val_set), m)
        return StageOutcome(rid, result.metrics, result.state_dict, False)

    def student(self, m: Manifest, method: str, seed: int, teacher_state, token_state, parent_id: str) -> StageOutcome:
        h = with_runtime(student_hash(m, method, seed), self.runtime)
        fp = stage_fingerprint(m, "student", method)
        key = stage_key(h, fp)
        tags = self._common_tags(m, "student", method, seed, h, fp)
        name = f"{m.task}/{method}/s{seed}"
        reused = self._reused("student", h, fp, name, parent_id)
        if reused is not None:
            return reused
        with self._claim("student", key, name):
            reused = self._reused("student", h, fp, name, parent_id)
            if reused is not None:
                return reused
            resumed = self._resumable("student", key, h, fp)
            self.tracker.fail_abandoned(h, "student", fp, keep=resumed and resumed.run_id)
            section = (m.student_train, "student_train")
            with self._stage_run("student", key, name, tags, m, parent_id, resumed, *section) as (rid, resume):
                with stages.use_runtime(self.runtime):
                    job = dict(
                        manifest=m, method=method, seed=seed, teacher_state=teacher_state, token_state=token_state
                    )
                    result = self._train("train_student", job, rid, resume)
                self.tracker.log_metrics(rid, result.metrics)
                with tempfile.TemporaryDirectory() as tmp:
                    path = Path(tmp) / "student.pt"
                    sha = ckpt.save_atomic(result.state_dict, path)
                    self.tracker.client.set_tag(rid, "checkpoint_sha256", sha)
                    self.tracker.client.log_artifact(rid, str(path), "checkpoint")
                if "masks" in result.extra:
                    self._log_masks(rid, result.extra["masks"], m)
        return StageOutcome(rid, result.metrics, None, False)

    # ---------------------------------------------------------------------------------------- training, resume
    def _resume_checkpoints(self, kind: str, key: str) -> ckpt.ResumeCheckpoints:
        return ckpt.ResumeCheckpoints(self.resumes / f"{kind}-{key}")

    def _resumable(self, kind: str, key: str, config_hash: str, fingerprint: str) -> Resumable | None:
        """The unfinished run of stage ``key`` to continue and its newest good resume checkpoint, or None.

        Called by the holder of the stage's claim, so no live process on this cache is computing it: a run left
        RUNNING (its process was killed) or FAILED (interrupted, or a crash) is abandoned. A checkpoint is
        used only for a run of this store with this stage's tags, written by as many processes as this job has."""
        found = self._resume_checkpoints(kind, key).latest(_say)
        if found is None:
            return None
        state, path = found
        run_id = str(state.get("run_id", ""))
        try:
            run = self.tracker.client.get_run(run_id)
        except Exception:  # not in this store
            run = None
        tags = run.data.tags if run is not None else {}
        ours = {"kind": kind, "config_hash": config_hash, "code_fingerprint": fingerprint}
        if (
            run is None
            or run.info.status not in ("RUNNING", "FAILED")
            or run.info.lifecycle_stage != "active"
            or any(tags.get(k) != v for k, v in ours.items())
        ):
            _say(f"resume: {path} is of run {run_id}, not an unfinished {kind} run of this store; starting at step 0")
            return None
        processes = distributed().world_size
        if int(state.get("world_size", 1)) != processes:
            _say(f"resume: {path} was written by {state.get('world_size')} processes, not {processes}; starting at 0")
            return None
        return Resumable(run_id, state, int(state["step"]))

    @contextmanager
    def _stage_run(
        self, kind: str, key: str, name: str, tags, m: Manifest, parent_id: str, resumed, cfg, section: str
    ) -> Iterator[tuple[str, Resume]]:
        """The stage's MLflow run (``resumed``: the abandoned one, RUNNING again) with its batch geometry in its
        tags, and the :class:`Resume` of its training; the resume checkpoints are dropped once it finished."""
        checkpoints = self._resume_checkpoints(kind, key)
        tags = {**tags, **geometry(cfg, section).tags()}
        resume_id = resumed.run_id if resumed is not None else None
        with self.tracker.run(self.prefix + name, tags, m.flat(), parent_id, resume_id=resume_id) as active:
            rid = active.info.run_id
            if resumed is None:
                checkpoints.clear()  # another store's, or an older code's: never continued
                self._log_manifest(rid, m)
            else:
                self.tracker.client.set_tag(rid, "resumed_from_step", str(resumed.step))
                _say(f"resumed {self.prefix + name} from step {resumed.step}")
            every = getattr(cfg, "checkpoint_every", 0)
            state = resumed.state if resumed is not None else None
            yield rid, Resume(every, state, self._resume_saver(checkpoints, rid, self.prefix + name))
        checkpoints.clear()

    def _resume_saver(self, checkpoints: ckpt.ResumeCheckpoints, rid: str, name: str):
        def save(state: dict[str, Any], step: int) -> None:
            path = checkpoints.save({**state, "run_id": rid, "run_name": name}, step)
            self._log_artifact_as(rid, path, "resume", "last.pt")  # the newest only: overwritten each time

        return save

    def _train(self, stage: str, kwargs: dict[str, Any], rid: str, resume: Resume) -> stages.StageResult:
        """Stage function ``stage`` of :mod:`.stages` (in a torchrun job, sent to the other processes first)."""
        with leading(stage, kwargs, resume):
            return getattr(stages, stage)(**kwargs, log=self._logger(rid), progress=self.progress, resume=resume)

    def _log_artifact_as(self, run_id: str, path: Path, artifact_dir: str, name: str) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            target = Path(tmp) / name
            target.write_bytes(path.read_bytes())
            self.tracker.client.log_artifact(run_id, str(target), artifact_dir)

    def _log_masks(self, run_id: str, images_and_masks, m: Manifest) -> None:
        images, masks = images_and_masks
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "masks.png"
            mask_grid_png(images, masks, token_features(m), path, title=f"{m.name}: receptive-token masks")
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
        if needs_tokens(m, methods):
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
    return 1 + needs_tokens(m, methods) + len(methods) * len(seeds)


def needs_tokens(m: Manifest, methods_run: list[str]) -> bool:
    """Whether any of ``methods_run`` needs stage-1 receptive tokens in ``m``."""
    return any(x != "baseline" and methods.get(x).uses_tokens(m) for x in methods_run)


def write_json_atomic(path: Path, payload: Any) -> None:
    ckpt.write_text_atomic(path, json.dumps(payload, indent=2, default=str))


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    return fn(), time.perf_counter() - start
