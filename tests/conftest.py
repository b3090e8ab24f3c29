"""Shared test set-up: one torch thread per xdist worker, deterministic golden tests, golden data location."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import pytest  # noqa: E402
import torch  # noqa: E402

# 2 cores, 2 xdist workers: one intra-op thread each (ECOSYSTEM.md §3: oversubscription is slower than serial).
torch.set_num_threads(1)

REFERENCE_DIR = Path(__file__).parent / "data" / "reference"


@pytest.fixture
def reference_dir() -> Path:
    return REFERENCE_DIR


@pytest.fixture
def golden_mode():
    """Float64, one thread, deterministic algorithms: the conditions the golden data was generated under."""
    old_dtype = torch.get_default_dtype()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_default_dtype(torch.float64)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_default_dtype(old_dtype)
        torch.use_deterministic_algorithms(old_det)
