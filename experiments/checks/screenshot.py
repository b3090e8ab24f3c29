"""A screenshot of the MLflow run-comparison page for one ablation, taken in headless Chromium against a real
``mlflow server`` on 127.0.0.1 serving the project's store.

``maskd-bench screenshot-compare [--ablation tokens]`` starts the server on the store (default: the repository's
``mlflow.db``), selects the student runs under the latest parent run of that ablation, opens
``#/compare-runs?runs=[...]`` in ``chromium --headless`` and writes
``reports/embedded/ablations/mlflow_compare_<knob>.png``. The server is stopped afterwards, also on errors.
Chromium comes from the system (``apt-get install chromium``); the command says so if it is missing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..engine.paths import repo_root
from ..engine.tracking import Tracker, default_tracking_uri

CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
    "--virtual-time-budget=25000",  # lets the React app fetch the runs and render before the shot
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def mlflow_server(
    backend_uri: str, port: int | None = None, log: Path | None = None, extra_args: tuple[str, ...] = ()
) -> Iterator[str]:
    """``mlflow server`` on 127.0.0.1 for ``backend_uri`` (one worker, no job execution); yields its URL once
    ``/health`` answers, and stops the server's process group afterwards."""
    port = port or free_port()
    exe = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or shutil.which("mlflow")
    if exe is None:
        raise FileNotFoundError("the mlflow command is not installed")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}
    out = log.open("wb") if log else subprocess.DEVNULL
    cmd = [exe, "server", "--backend-store-uri", backend_uri, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--workers", "1", *extra_args], stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None:
                tail = log.read_text(errors="replace")[-2000:] if log else ""
                raise RuntimeError(f"mlflow server exited with status {proc.returncode}: {tail}")
            if time.time() > deadline:
                raise RuntimeError(f"mlflow server did not answer on {url} within 120 s (log: {log})")
            time.sleep(0.5)
        yield url
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
        if log:
            out.close()


def compare_url(base: str, experiment_id: str, run_ids: list[str]) -> str:
    runs = urllib.parse.quote(json.dumps(run_ids, separators=(",", ":")))
    exps = urllib.parse.quote(json.dumps([experiment_id], separators=(",", ":")))
    return f"{base}/#/compare-runs?runs={runs}&experiments={exps}"


def ablation_runs(tracker: Tracker, knob: str) -> tuple[str, list[str]]:
    """The latest parent run of ablation ``knob`` and its student children (seed order within each variant)."""
    parents = tracker.client.search_runs(
        [tracker.experiment_id],
        f"tags.kind = 'ablation' and tags.ablation = '{knob}' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not parents:
        raise FileNotFoundError(
            f"no finished ablation '{knob}' in the store; run `maskd-bench ablations --only {knob}` first"
        )
    children = [r for r in tracker.children(parents[0].info.run_id) if r.data.tags.get("kind") == "student"]
    children.sort(key=lambda r: (r.data.tags.get("variant", ""), r.data.tags.get("seed", "")))
    return parents[0].info.run_id, [r.info.run_id for r in children]


def screenshot(url: str, path: Path, size: tuple[int, int] = (1600, 1100)) -> Path:
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        raise FileNotFoundError("no Chromium found: install it (Debian: apt-get install -y chromium)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run(
            [
                exe,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={tmp}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=180,
        )
    if not tmp.is_file() or tmp.stat().st_size < 10_000:
        raise RuntimeError(f"Chromium wrote no usable screenshot for {url}")
    tmp.replace(path)
    return path


def screenshot_compare(knob: str = "tokens", tracking_uri: str | None = None, out: Path | None = None) -> Path:
    uri = tracking_uri or default_tracking_uri()
    if not uri.startswith("sqlite:"):
        raise ValueError(f"screenshot-compare serves a sqlite store itself; got {uri}")
    tracker = Tracker(uri)
    _, run_ids = ablation_runs(tracker, knob)
    root = repo_root() or Path.cwd()
    out = out or root / "reports" / "embedded" / "ablations" / f"mlflow_compare_{knob}.png"
    with tempfile.TemporaryDirectory() as tmp, mlflow_server(uri, log=Path(tmp) / "server.log") as base:
        return screenshot(compare_url(base, tracker.experiment_id, run_ids), out)
