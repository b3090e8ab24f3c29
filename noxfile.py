"""Sessions: ``tests`` (the CI gate), ``bench_losses``, ``bench_teacher_cache``, ``bench_cpu_isa``, ``check_golden``,
``reproduce_table``, ``ablations``, ``mlflow_ui``, ``lint``.

Virtualenvs are built by uv and reused (a torch venv is 5.5 GB; uv hard-links it from its cache in seconds, see
shared ECOSYSTEM.md §2). Every session that imports torch installs the project itself, so a fresh clone needs only
``pip install nox uv``.
"""

from __future__ import annotations

import os

import nox

nox.options.default_venv_backend = "uv|venv"
nox.options.reuse_venv = "yes"
nox.options.sessions = ["tests"]

PYTHON = "3.11"
ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "PYTHONHASHSEED": "0"}
os.environ.update(ENV)


@nox.session(python=PYTHON)
def tests(session: nox.Session) -> None:
    """The test suite on all cores, one torch thread per xdist worker (tests/conftest.py)."""
    session.install("-e", ".[test]")
    session.run("pytest", "-n", "auto", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def bench_losses(session: nox.Session) -> None:
    """Forward+backward time and peak memory of every loss: writes reports/bench_losses.{md,csv}."""
    session.install("-e", ".")
    session.run("python", "-m", "experiments.checks.bench_losses", "--out", "reports", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def bench_teacher_cache(session: nox.Session) -> None:
    """Distillation steps with the teacher's features cached vs computed: reports/bench_teacher_cache.{md,csv}."""
    session.install("-e", ".")
    module = "experiments.checks.bench_teacher_cache"
    session.run("python", "-m", module, "--out", "reports", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def bench_cpu_isa(session: nox.Session) -> None:
    """The CPU-kernel pin: pinned vs native numbers and speed, and the pinned weights vs the committed fingerprint
    (``-- --record`` writes it): reports/bench_cpu_isa.{md,csv}."""
    session.install("-e", ".")
    session.run("python", "-m", "experiments.checks.bench_cpu_isa", "--out", "reports", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def check_golden(session: nox.Session) -> None:
    """The golden checker on the shipped reference cases (or on a directory given after ``--``)."""
    session.install("-e", ".")
    target = session.posargs or ["tests/data/reference"]
    session.run("maskd-bench", "check-golden", *target, env=ENV)


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", ".")


@nox.session(python=PYTHON)
def reproduce_table(session: nox.Session) -> None:
    """The embedded main table: reports/embedded/main_table.{md,csv}. ``-- --profile smoke`` for a quick run."""
    session.install("-e", ".")
    session.run("maskd-bench", "reproduce", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def tables(session: nox.Session) -> None:
    """Rewrite every committed table that has a shipped export (``runs.jsonl``) from the export alone: no training,
    no MLflow store. ``-- --check`` writes nothing and fails if a committed table differs."""
    # Bytecode compiled once at install: where PYTHONDONTWRITEBYTECODE is set, every run would otherwise compile
    # torch's and mlflow's sources again (13.7 s of a 25 s rebuild, measured with cProfile on a fresh clone).
    session.install("-e", ".", env={"UV_COMPILE_BYTECODE": "1"})
    session.run("maskd-bench", "tables", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def ablations(session: nox.Session) -> None:
    """MasKD ablations: reports/embedded/ablations/<knob>.{md,csv,png}. ``-- --only tokens`` runs one ablation,
    ``-- --profile smoke`` all of them in a few minutes (meaningless numbers)."""
    session.install("-e", ".")
    session.run("maskd-bench", "ablations", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def mlflow_ui(session: nox.Session) -> None:
    """The MLflow UI on the repository's store, lean settings for a small machine (ECOSYSTEM.md §1)."""
    session.install("-e", ".")
    session.run(
        "mlflow",
        "ui",
        "--backend-store-uri",
        "sqlite:///mlflow.db",
        "--host",
        "127.0.0.1",
        "--port",
        "5000",
        "--workers",
        "1",
        *session.posargs,
        env={**ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
    )


@nox.session(python=PYTHON)
def mlflow_screenshot(session: nox.Session) -> None:
    """reports/embedded/ablations/mlflow_compare_<knob>.png: the MLflow compare page of an ablation's runs, taken
    in headless Chromium (Debian: ``apt-get install -y chromium``) against a real mlflow server on 127.0.0.1."""
    session.install("-e", ".")
    session.run("maskd-bench", "screenshot-compare", *session.posargs, env=ENV)


@nox.session(python=PYTHON)
def bench_executors(session: nox.Session) -> None:
    """The smoke table with ``--executor local`` and ``--executor ray`` (2 workers x 1 thread), end to end:
    reports/bench_executors.{md,csv}. ``-- --case segmentation-1`` adds a reduced default table."""
    session.install("-e", ".")
    session.run("python", "-m", "experiments.checks.bench_executors", "--out", "reports", *session.posargs, env=ENV)
