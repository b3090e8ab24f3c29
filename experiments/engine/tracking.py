"""MLflow tracking: a real store (MLflow's convention by default: ``$MLFLOW_TRACKING_URI``, else
``sqlite:///mlflow.db`` in the current directory; or any tracking URI, including an ``mlflow server`` over HTTP),
runs that end FINISHED or FAILED and never stay RUNNING, and reuse of finished runs by config hash and code
fingerprint. Creating or migrating a sqlite store is serialised by a lock file beside it (``<db>.lock``), so
several processes may start on one new store at once.

Tags written on every run: ``kind`` (table, teacher, tokens, student), ``task``, ``method``, ``seed``,
``config_hash``, ``git_commit``, ``host``, ``pid`` and the versions of torch, torchvision and mlflow.
"""

from __future__ import annotations

import atexit
import os
import platform
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Run, RunStatus, RunTag
from mlflow.tracking import MlflowClient

from .locks import store_setup_lock
from .paths import repo_root

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

EXPERIMENT = "maskd-embedded"


def default_tracking_uri() -> str:
    """MLflow's own default: ``$MLFLOW_TRACKING_URI`` if set, else ``sqlite:///mlflow.db`` in the current directory."""
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


_GIT_COMMIT: str | None = None


def git_commit() -> str:
    """HEAD of the checkout (``-dirty`` when tracked files differ), read without taking git's index lock
    (``GIT_OPTIONAL_LOCKS=0``: ``git status`` would otherwise refresh the index under ``index.lock`` and make a
    concurrent ``git add``/``commit`` in the same checkout fail)."""
    global _GIT_COMMIT
    if _GIT_COMMIT is not None:
        return _GIT_COMMIT
    root = repo_root()
    if root is None:
        return "unknown"
    env = {**os.environ, "GIT_OPTIONAL_LOCKS": "0"}
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, env=env
        )
        commit = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            env=env,
        ).stdout.strip()
        _GIT_COMMIT = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        _GIT_COMMIT = "unknown"
    return _GIT_COMMIT


def environment_tags() -> dict[str, str]:
    import torch
    import torchvision

    return {
        "git_commit": git_commit(),
        "host": socket.gethostname(),
        "pid": str(os.getpid()),
        "torch_version": torch.__version__,
        "torchvision_version": torchvision.__version__,
        "mlflow_version": mlflow.__version__,
        "python_version": platform.python_version(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }


def parent_tags(kind: str, task: str = "all", **extra: str) -> dict[str, str]:
    """Tags of a parent run that groups stage runs (a table, one manifest, a calibration)."""
    return {"kind": kind, "task": task, "method": "all", "seed": "all", "config_hash": kind, **extra}


class Tracker:
    """One MLflow experiment on one tracking URI."""

    def __init__(self, tracking_uri: str | None = None, experiment: str = EXPERIMENT) -> None:
        self.uri = tracking_uri or default_tracking_uri()
        with store_setup_lock(self.uri):  # a new sqlite store: one process creates the tables, the others wait
            mlflow.set_tracking_uri(self.uri)
            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                try:
                    self.experiment_id = self.client.create_experiment(experiment)
                except mlflow.exceptions.MlflowException:  # created meanwhile by another client (http store)
                    exp = self.client.get_experiment_by_name(experiment)
                    if exp is None:
                        raise
            if exp is not None:
                self.experiment_id = exp.experiment_id
            mlflow.set_experiment(experiment_id=self.experiment_id)
        self._env = environment_tags()

    # ---------------------------------------------------------------------------------------- queries
    def find_finished(self, config_hash: str, kind: str, fingerprint: str | None = None) -> Run | None:
        """The newest FINISHED run of ``kind`` with ``config_hash`` (and, if given, code ``fingerprint``: tag
        ``code_fingerprint``) that is not itself a reuse record."""
        where = f"tags.config_hash = '{config_hash}' and tags.kind = '{kind}' and attributes.status = 'FINISHED'"
        if fingerprint is not None:
            where += f" and tags.code_fingerprint = '{fingerprint}'"
        runs = self.client.search_runs(
            [self.experiment_id], filter_string=where, order_by=["attributes.start_time DESC"], max_results=50
        )
        for run in runs:
            if "reused_from" not in run.data.tags:
                return run
        return None

    def fail_abandoned(
        self, config_hash: str, kind: str, fingerprint: str | None = None, keep: str | None = None
    ) -> list[str]:
        """Mark this host's RUNNING runs of ``kind``/``config_hash`` FAILED, but ``keep`` (the run about to be
        resumed). Called by the holder of that hash's claim: a live owner would hold the claim, so such a run was
        left by a killed process. Returns their ids."""
        where = f"tags.config_hash = '{config_hash}' and tags.kind = '{kind}' and attributes.status = 'RUNNING'"
        if fingerprint is not None:
            where += f" and tags.code_fingerprint = '{fingerprint}'"
        host, failed = socket.gethostname(), []
        for run in self.client.search_runs([self.experiment_id], filter_string=where, max_results=1000):
            if run.data.tags.get("host") != host or run.data.tags.get("pid") == str(os.getpid()):
                continue
            if run.info.run_id == keep:
                continue
            self.client.set_tag(run.info.run_id, "failure", "abandoned: its process ended without closing the run")
            self.client.set_terminated(run.info.run_id, status="FAILED")
            failed.append(run.info.run_id)
        return failed

    def children(self, parent_run_id: str) -> list[Run]:
        return self.client.search_runs(
            [self.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'",
            max_results=5000,
        )

    def fail_stale_runs(self) -> list[str]:
        """Mark RUNNING runs whose process is gone (same host, pid not alive) as FAILED. Returns their ids."""
        host = socket.gethostname()
        stale = []
        for run in self.client.search_runs(
            [self.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000
        ):
            tags = run.data.tags
            if tags.get("host") != host or not tags.get("pid", "").isdigit():
                continue
            pid = int(tags["pid"])
            if pid == os.getpid():
                continue
            try:
                os.kill(pid, 0)
                continue  # still alive: someone else's run in progress
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
            self.client.set_tag(run.info.run_id, "failure", "process ended without closing the run")
            self.client.set_terminated(run.info.run_id, status="FAILED")
            stale.append(run.info.run_id)
        return stale

    # ---------------------------------------------------------------------------------------- runs
    @contextmanager
    def run(
        self,
        name: str,
        tags: Mapping[str, Any],
        params: Mapping[str, Any] | None = None,
        parent_run_id: str | None = None,
        resume_id: str | None = None,
    ) -> Iterator[mlflow.ActiveRun]:
        """Start a run (nested under ``parent_run_id`` if given), or continue the unfinished run ``resume_id``
        (RUNNING again, with this process's tags and parent; its params were logged when it began). It ends
        FINISHED when the block completes and FAILED (with the error as a tag) when it raises, KeyboardInterrupt
        and SystemExit included."""
        all_tags = {**self._env, **{k: str(v) for k, v in tags.items()}}
        if parent_run_id:
            all_tags["mlflow.parentRunId"] = parent_run_id
        if resume_id is None:
            run_id = self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id
        else:
            run_id, params = resume_id, None
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in all_tags.items()], synchronous=True)
            if "failure" in self.client.get_run(run_id).data.tags:
                self.client.delete_tag(run_id, "failure")
            self.client.update_run(run_id, status="RUNNING")
        try:
            if params:
                self.log_params(run_id, params)
            with mlflow.start_run(run_id=run_id, nested=mlflow.active_run() is not None) as active:
                yield active
        except BaseException as exc:
            if not hasattr(exc, "mlflow_run_id"):  # the innermost run that failed, for the one-line error
                try:
                    exc.mlflow_run_id = run_id
                    exc.mlflow_run_name = name
                except AttributeError:
                    pass
            self.client.set_tag(run_id, "failure", f"{type(exc).__name__}: {exc}"[:5000])
            self.client.set_terminated(run_id, status="FAILED")
            raise
        else:
            # start_run's context has already ended the run FINISHED; make sure of it.
            if self.client.get_run(run_id).info.status != "FINISHED":
                self.client.set_terminated(run_id, status="FINISHED")

    def log_params(self, run_id: str, params: Mapping[str, Any]) -> None:
        items = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100], synchronous=True)

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        ts = int(time.time() * 1000)
        items = [mlflow.entities.Metric(k, float(v), ts, step or 0) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self.client.log_batch(run_id, metrics=items[i : i + 1000], synchronous=True)

    def record_reuse(self, source: Run, name: str, parent_run_id: str, extra_tags: Mapping[str, Any] = ()) -> str:
        """A FINISHED child under ``parent_run_id`` that points at ``source`` and copies its final metrics and
        params, so each table's parent holds every run the table uses."""
        tags = {k: v for k, v in source.data.tags.items() if not k.startswith("mlflow.")}
        tags.update({k: str(v) for k, v in dict(extra_tags).items()})
        tags.update({"reused_from": source.info.run_id, "mlflow.parentRunId": parent_run_id})
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        self.log_params(run.info.run_id, source.data.params)
        self.log_metrics(run.info.run_id, source.data.metrics)
        self.client.set_terminated(run.info.run_id, status="FINISHED")
        return run.info.run_id

    def download(self, run_id: str, artifact_path: str, dst: Path | None = None) -> Path:
        """Download an artifact into ``dst``; without ``dst``, into a ``maskd-artifact-*`` temporary folder that
        is removed when the process exits (prefer :meth:`downloaded`, which removes it after the block)."""
        if dst is None:
            dst = Path(tempfile.mkdtemp(prefix="maskd-artifact-"))
            _TEMP_DIRS.append(dst)
        try:
            return Path(
                mlflow.artifacts.download_artifacts(
                    run_id=run_id, artifact_path=artifact_path, dst_path=str(dst), tracking_uri=self.uri
                )
            )
        except BaseException:
            if dst in _TEMP_DIRS:
                _TEMP_DIRS.remove(dst)
                shutil.rmtree(dst, ignore_errors=True)
            raise

    @contextmanager
    def downloaded(self, run_id: str, artifact_path: str) -> Iterator[Path]:
        """An artifact downloaded into a temporary folder that is removed when the block ends."""
        with tempfile.TemporaryDirectory(prefix="maskd-artifact-") as tmp:
            yield self.download(run_id, artifact_path, Path(tmp))


_TEMP_DIRS: list[Path] = []


@atexit.register
def _remove_temp_dirs() -> None:
    for path in _TEMP_DIRS:
        shutil.rmtree(path, ignore_errors=True)


def run_status(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).info.status


__all__ = [
    "EXPERIMENT",
    "Tracker",
    "parent_tags",
    "RunStatus",
    "default_tracking_uri",
    "environment_tags",
    "git_commit",
]
