"""Where a table's stage graph runs: in this process (``local``, the default) or as Ray tasks (``ray``).

A :class:`StageGraph` lists the stages of a table in the order the local executor runs them (teacher, tokens,
students), each with the stages whose output it needs. Both executors run every stage through the same
:class:`~.pipeline.Pipeline` method, so the Pipeline alone decides reuse: a stage whose config hash has a
FINISHED run is recorded as a reuse, and a stage claimed by another process (another driver, another worker) is
waited for and then reused.

``local`` runs the graph in order in this process, passing teacher and token weights in memory (today's
behaviour). ``ray`` submits one ``@ray.remote`` task per stage, each with ``num_cpus`` (its torch threads) and
``num_gpus``. A task gets its inputs as small :class:`StageResult` records (run ids, no weights): Ray starts it
when they exist, and the task builds its own Tracker and Pipeline from the tracking URI and loads the teacher or
token weights from the cache or else from the upstream run's artifacts. A task whose worker or node dies is
retried (``max_retries``); the retry finds the dead attempt's run RUNNING with its claim released, and continues
it from its last resume checkpoint in this host's cache (``checkpoint_every``), or else marks it FAILED and trains
again (a teacher whose checkpoint reached the cache is evaluated, not retrained). After the
graph, the driver marks any child of its parent still RUNNING (an attempt that died on another host) FAILED.

Claims are lock files in the cache (:mod:`.locks`): workers on one host, or on hosts sharing the cache on a
network file system, wait for each other on one config hash. Within one graph a stage needed twice (same kind and
hash) is submitted after its first node (``same_as``) and reuses it without waiting on a claim.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from .. import methods as method_registry
from .locks import CLAIM_TIMEOUT_ENV_VAR
from .manifest import Manifest
from .paths import CACHE_ENV_VAR, cache_root
from .pipeline import STALE_REUSED, Pipeline, StaleReuse, needs_tokens, student_hash, teacher_hash, tokens_hash

EXECUTORS = ("local", "ray")
#: Object store of a ``--ray-address local`` cluster: stage results are a few kB, weights never travel through it.
LOCAL_OBJECT_STORE_BYTES = 200 * 1024 * 1024


# ------------------------------------------------------------------------------------------ the graph
@dataclass(frozen=True)
class StageNode:
    """One stage of a table: ``kind`` teacher, tokens or student, with the keys of the stages it needs."""

    key: str  # unique in its graph; the run name (prefix included)
    kind: str
    manifest: Manifest
    method: str
    seed: int
    config_hash: str  # without amp: the graph's identity of the stage
    prefix: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    teacher: str | None = None  # key of the teacher stage whose weights it needs
    tokens: str | None = None  # key of the tokens stage whose weights it needs
    same_as: str | None = None  # an earlier node of the same stage (kind and hash): run after it, reuse it

    @property
    def deps(self) -> list[str]:
        return [k for k in (self.teacher, self.tokens, self.same_as) if k is not None]

    @property
    def outcome_name(self) -> str:
        """The name :meth:`Pipeline.run_manifest` gives the outcome (``teacher``, ``tokens``, ``maskd/s0``)."""
        return self.kind if self.kind != "student" else f"{self.method}/s{self.seed}"


class StageGraph:
    """The stages of one parent run, in a topological order (a stage after the stages it needs)."""

    def __init__(self) -> None:
        self.nodes: dict[str, StageNode] = {}
        self._first: dict[tuple[str, str], str] = {}

    def __len__(self) -> int:
        return len(self.nodes)

    def _add(self, kind: str, m: Manifest, method: str, seed: int, h: str, prefix: str, labels, **deps) -> str:
        name = prefix + (f"{m.task}/{kind}" if kind != "student" else f"{m.task}/{method}/s{seed}")
        key, n = name, 1
        while key in self.nodes:
            n += 1
            key = f"{name}#{n}"
        first = self._first.setdefault((kind, h), key)
        node = StageNode(
            key, kind, m, method, seed, h, prefix, {k: str(v) for k, v in labels.items()},
            same_as=None if first == key else first, **deps,
        )  # fmt: skip
        self.nodes[key] = node
        return key

    def teacher(self, m: Manifest, prefix: str = "", **labels: str) -> str:
        return self._add("teacher", m, "teacher", 0, teacher_hash(m), prefix, labels)

    def tokens(self, m: Manifest, teacher: str, prefix: str = "", **labels: str) -> str:
        return self._add("tokens", m, "maskd", 0, tokens_hash(m), prefix, labels, teacher=teacher)

    def student(
        self, m: Manifest, method: str, seed: int, teacher: str | None, tokens: str | None, prefix="", **labels: str
    ) -> str:
        if method == "baseline":
            teacher = tokens = None  # the baseline student needs no teacher: it starts at once
        elif not method_registry.get(method).uses_tokens(m):
            tokens = None
        h = student_hash(m, method, seed)
        return self._add("student", m, method, seed, h, prefix, labels, teacher=teacher, tokens=tokens)

    def add_manifest(self, m: Manifest, methods: list[str] | None = None, seeds: list[int] | None = None) -> None:
        """The stages of :meth:`Pipeline.run_manifest`: teacher, tokens if needed, every method x seed."""
        methods = methods or m.methods
        seeds = seeds if seeds is not None else m.protocol.seeds
        teacher = self.teacher(m)
        tokens = self.tokens(m, teacher) if needs_tokens(m, methods) else None
        for method in methods:
            for seed in seeds:
                self.student(m, method, seed, teacher, tokens)


@dataclass
class StageResult:
    """What a finished stage hands on and shows: small, so that it travels between Ray workers."""

    key: str
    kind: str
    run_id: str  # this table's child run (a reuse record when ``reused``)
    source_run_id: str  # the run that computed it: the one whose checkpoint children load
    metrics: dict[str, float]
    reused: bool
    seconds: float = 0.0
    host: str = ""
    pid: int = 0
    stale: list[StaleReuse] = field(default_factory=list)
    state_dict: Any = None  # the local executor's weights in memory; never set by a Ray task

    def line(self, primary: str | None = None) -> str:
        value = self.metrics.get(primary, float("nan")) if primary else float("nan")
        how = "reused" if self.reused else f"{self.seconds:6.1f} s"
        where = f" on {self.host} pid {self.pid}" if self.host else ""
        return f"done   {self.key:34s} {primary or '':5s} {value:7.2f}  run {self.run_id}  {how}{where}"


class StageFailed(RuntimeError):
    """A stage of the graph failed; ``cause`` is the stage's own exception (re-raised by the driver)."""


# ------------------------------------------------------------------------------------------ one stage
def run_node(pipeline: Pipeline, node: StageNode, parent_id: str, teacher_state=None, token_state=None):
    """Run (or reuse) ``node`` through ``pipeline``'s own stage method; returns its StageOutcome."""
    pipeline.labelled(node.prefix, **node.labels)
    try:
        m = node.manifest
        if node.kind == "teacher":
            return pipeline.teacher(m, parent_id)
        if node.kind == "tokens":
            return pipeline.tokens(m, teacher_state, parent_id)
        return pipeline.student(m, node.method, node.seed, teacher_state, token_state, parent_id)
    finally:
        pipeline.labelled()


def _source(pipeline: Pipeline, run_id: str, reused: bool) -> str:
    if not reused:
        return run_id
    return pipeline.tracker.client.get_run(run_id).data.tags.get("reused_from", run_id)


def load_stage_state(pipeline: Pipeline, m: Manifest, kind: str, source_run_id: str):
    """The weights a finished teacher or tokens run handed on: from this host's cache (sha256-checked), else
    downloaded from the run's artifacts through the tracking server."""
    from . import checkpoints as ckpt
    from . import stages
    from .pipeline import stage_key

    run = pipeline.tracker.client.get_run(source_run_id)
    key = stage_key(run.data.tags["config_hash"], run.data.tags["code_fingerprint"])

    def validate(state) -> None:
        if kind == "teacher":
            from ..tasks import get_task

            get_task(m.task).build_model(m.teacher).load_state_dict(state, strict=True)
        else:
            stages.build_mask_learner(m).load_state_dict(state, strict=True)

    state = pipeline._checkpoint(run, key, kind, validate)
    if state is None:
        raise ckpt.CheckpointError(f"run {source_run_id}: no usable {kind} checkpoint in the cache or its artifacts")
    return state


# ------------------------------------------------------------------------------------------ executors
class Executor:
    """Runs a :class:`StageGraph` under one parent run; returns every stage's :class:`StageResult` by key."""

    name = "executor"

    def run(
        self, graph: StageGraph, pipeline: Pipeline, parent_id: str, overall: tqdm | None = None
    ) -> dict[str, StageResult]:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self) -> Executor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _tick(overall: tqdm | None, label: str) -> None:
    if overall is not None:
        overall.set_postfix_str(label)
        overall.update(1)


class LocalExecutor(Executor):
    """The graph in order in this process, weights passed in memory, with ``threads`` torch threads (default:
    leave the process's setting)."""

    name = "local"

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads

    def run(self, graph, pipeline, parent_id, overall=None):
        if self.threads is not None:
            import torch

            torch.set_num_threads(self.threads)
        results: dict[str, StageResult] = {}
        for node in graph.nodes.values():
            teacher = results[node.teacher].state_dict if node.teacher else None
            tokens = results[node.tokens].state_dict if node.tokens else None
            start = time.perf_counter()
            out = run_node(pipeline, node, parent_id, teacher, tokens)
            results[node.key] = StageResult(
                node.key, node.kind, out.run_id, "", out.metrics, out.reused,
                time.perf_counter() - start, state_dict=out.state_dict,
            )  # fmt: skip
            _tick(overall, node.key)
        return results


@dataclass(frozen=True)
class WorkerSettings:
    """What a Ray task needs to build its own Tracker and Pipeline."""

    tracking_uri: str
    reuse: bool
    reuse_stale: bool
    device: str
    amp: str
    threads: int


_TRACKERS: dict[str, Any] = {}


def _worker_pipeline(settings: WorkerSettings) -> Pipeline:
    import torch

    from .stages import Runtime
    from .tracking import Tracker

    torch.set_num_threads(settings.threads)
    tracker = _TRACKERS.get(settings.tracking_uri)
    if tracker is None:  # one per worker process: opening a store and reading the git commit cost a second
        tracker = _TRACKERS[settings.tracking_uri] = Tracker(settings.tracking_uri)
    runtime = Runtime(settings.device, settings.amp)
    return Pipeline(tracker, progress=False, reuse=settings.reuse, runtime=runtime, reuse_stale=settings.reuse_stale)


def ray_stage(node: StageNode, parent_id: str, settings: WorkerSettings, *upstream: StageResult) -> StageResult:
    """The body of a stage's Ray task: one stage through the Pipeline, inputs loaded by run id."""
    import socket

    start = time.perf_counter()
    pipeline = _worker_pipeline(settings)
    by_key = {r.key: r for r in upstream}
    teacher = tokens = None
    if node.teacher:
        teacher = load_stage_state(pipeline, node.manifest, "teacher", by_key[node.teacher].source_run_id)
    if node.tokens:
        tokens = load_stage_state(pipeline, node.manifest, "tokens", by_key[node.tokens].source_run_id)
    stale_before = len(STALE_REUSED)
    out = run_node(pipeline, node, parent_id, teacher, tokens)
    return StageResult(
        node.key, node.kind, out.run_id, _source(pipeline, out.run_id, out.reused), out.metrics, out.reused,
        time.perf_counter() - start, socket.gethostname(), os.getpid(), STALE_REUSED[stale_before:],
    )  # fmt: skip


class RayExecutor(Executor):
    """Each stage a Ray task with ``stage_cpus`` CPUs (= its torch threads) and ``stage_gpus`` GPUs.

    ``address``: ``local`` starts a cluster in this process with ``local_cpus`` CPUs (default: all cores);
    ``auto`` joins the cluster ``ray start`` made on this host; ``HOST:PORT`` joins that one. ``lines`` prints a
    line per finished or failed stage (to stderr)."""

    name = "ray"

    def __init__(
        self,
        address: str = "local",
        stage_cpus: int = 1,
        stage_gpus: float = 0,
        local_cpus: int | None = None,
        max_retries: int = 3,
        device: str = "cpu",
        amp: str = "none",
        lines: Callable[[str], None] | None = None,
    ) -> None:
        self.address = address
        self.stage_cpus = stage_cpus
        self.stage_gpus = stage_gpus if stage_gpus or not device.startswith("cuda") else 1
        self.local_cpus = local_cpus
        self.max_retries = max_retries
        self.device = "cuda" if device.startswith("cuda") else device  # Ray hands each task its own GPU
        self.amp = amp
        self.lines = lines or (lambda text: tqdm.write(text, file=sys.stderr))  # above the bar, not through it
        self._started = False

    @property
    def threads(self) -> int:
        """Torch threads of each stage: its CPUs (:func:`_worker_pipeline` sets them)."""
        return self.stage_cpus

    def _connect(self, tracking_uri: str) -> None:
        import ray

        if ray.is_initialized():
            return
        env = {"MLFLOW_TRACKING_URI": tracking_uri, "MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONHASHSEED": "0"}
        for var in (CACHE_ENV_VAR, CLAIM_TIMEOUT_ENV_VAR):
            if os.environ.get(var):
                env[var] = os.environ[var]
        if self.address == "local":
            env[CACHE_ENV_VAR] = str(cache_root())  # same host: the workers share the driver's cache and claims
            # Ray starts workers at nice 15; the stages are the work here, not background jobs: the driver's priority
            os.environ.setdefault("RAY_worker_niceness", "0")
            ray.init(
                address="local",  # a new cluster even where `ray start` left one (or its address file)
                num_cpus=self.local_cpus or os.cpu_count() or 1,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                runtime_env={"env_vars": env},
                logging_level="warning",
            )
        else:
            _use_cluster_token()
            ray.init(address=self.address, runtime_env={"env_vars": env}, logging_level="warning")
        self._started = True

    def close(self) -> None:
        if self._started:
            import ray

            ray.shutdown()
            self._started = False

    def run(self, graph, pipeline, parent_id, overall=None):
        import ray

        self._connect(pipeline.tracker.uri)
        settings = WorkerSettings(
            pipeline.tracker.uri, pipeline.reuse, pipeline.reuse_stale, self.device, self.amp, self.stage_cpus
        )
        remote = ray.remote(ray_stage)
        refs: dict[str, Any] = {}
        for node in graph.nodes.values():
            options = dict(
                num_cpus=self.stage_cpus,
                num_gpus=self.stage_gpus,
                max_retries=self.max_retries,
                retry_exceptions=[ConnectionError],
                name=node.key,
            )
            refs[node.key] = remote.options(**options).remote(node, parent_id, settings, *[refs[k] for k in node.deps])
        pending = {ref: key for key, ref in refs.items()}
        try:
            results, first_error = self._collect(graph, pending, overall)
        except BaseException:  # interrupted (Ctrl-C, SIGTERM): stop the stages, leave none RUNNING
            for ref in pending:
                ray.cancel(ref, force=True)
            _fail_orphans(pipeline, parent_id)
            raise
        _fail_orphans(pipeline, parent_id)
        if first_error is not None:
            raise first_error
        return results

    def _collect(self, graph: StageGraph, pending: dict, overall: tqdm | None):
        """Wait for every stage; a line for each as it ends. Returns the results and the first stage error."""
        import ray

        from ..tasks import get_task

        results: dict[str, StageResult] = {}
        failed: dict[str, BaseException] = {}
        first_error: BaseException | None = None
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                key = pending.pop(ref)
                node = graph.nodes[key]
                try:
                    result = ray.get(ref)
                except Exception as exc:  # the stage's own error, or its worker died more often than retried
                    failed[key] = exc
                    if any(dep in failed for dep in node.deps):
                        self.lines(f"skip   {key:34s} (a stage it needs failed)")
                    else:
                        cause = _cause(exc)
                        run_id = getattr(cause, "mlflow_run_id", None)
                        first_error = first_error or cause
                        self.lines(
                            f"FAILED {key:34s} {type(cause).__name__}: {_first_line(cause)}"
                            + (f"  (MLflow run {run_id} ended FAILED)" if run_id else "")
                        )
                    _tick(overall, f"{key} failed")
                    continue
                results[key] = result
                STALE_REUSED.extend(result.stale)
                self.lines(result.line(get_task(node.manifest.task).primary_metric))
                _tick(overall, key)
        return results, first_error


def _use_cluster_token() -> None:
    """Send the cluster's token: ``ray start`` enables token authentication and writes ``~/.ray/auth_token``
    (or ``$RAY_AUTH_TOKEN_PATH``, ``$RAY_AUTH_TOKEN``), but a driver given ``HOST:PORT`` sends it only in token
    mode, which Ray reads once (hence its own helper, which also refreshes its config)."""
    try:
        from ray._private.authentication.authentication_token_setup import (
            maybe_enable_token_auth_if_token_available,
        )
    except ImportError:  # another Ray: set the mode and hope it is read later
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or os.path.isfile(path)):
            os.environ["RAY_AUTH_MODE"] = "token"
        return
    maybe_enable_token_auth_if_token_available(warn_if_disabled=False)


def _cause(exc: BaseException) -> BaseException:
    """The stage's own exception inside Ray's wrapper (so the CLI maps it as it does for the local executor)."""
    cause = getattr(exc, "cause", None)
    return cause if isinstance(cause, BaseException) else exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _fail_orphans(pipeline: Pipeline, parent_id: str) -> list[str]:
    """Children of ``parent_id`` still RUNNING once every stage has returned: attempts whose worker died (the
    retry made its own run). Marked FAILED, wherever the worker ran."""
    client, orphans = pipeline.tracker.client, []
    for run in pipeline.tracker.children(parent_id):
        if run.info.status == "RUNNING":
            client.set_tag(run.info.run_id, "failure", "abandoned: its Ray worker died; the stage was retried")
            client.set_terminated(run.info.run_id, status="FAILED")
            orphans.append(run.info.run_id)
    return orphans


def make_executor(
    name: str = "local",
    address: str = "local",
    stage_cpus: int = 1,
    stage_gpus: float = 0,
    local_cpus: int | None = None,
    device: str = "cpu",
    amp: str = "none",
) -> Executor:
    if name == "local":
        return LocalExecutor(stage_cpus)
    if name == "ray":
        return RayExecutor(address, stage_cpus, stage_gpus, local_cpus, device=device, amp=amp)
    raise ValueError(f"executor {name!r} is not one of {', '.join(EXECUTORS)}")


__all__ = [
    "EXECUTORS",
    "Executor",
    "LocalExecutor",
    "RayExecutor",
    "StageGraph",
    "StageNode",
    "StageResult",
    "load_stage_state",
    "make_executor",
    "ray_stage",
    "run_node",
]
