"""The CPU-kernel pin (experiments/cpu_isa.py): set on import, named in tags, and a pinned training is repeatable bit
for bit. Each case trains three steps of the smoke segmentation teacher in a fresh process (the libraries read the
variables once), through the benchmark's own child (experiments/checks/bench_cpu_isa.py)."""

from __future__ import annotations

import platform

import pytest

from experiments.checks.bench_cpu_isa import run_child

pytestmark = pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="x86-64 pins only")
SMOKE = "embedded_segmentation_smoke"


def test_pinned_training_is_repeatable_and_names_its_kernels(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path))
    first, second = run_child("pinned", 3, SMOKE), run_child("pinned", 3, SMOKE)
    assert first["kernels"] == "aten=avx2 onednn=AVX2 mkl=AVX2"
    assert len(first["losses"]) == 3 and first["weights_sha256"] == second["weights_sha256"]
    assert first["losses"] == second["losses"]


def test_opting_out_leaves_the_libraries_free(tmp_path, monkeypatch):
    monkeypatch.setenv("MASKD_BENCH_CACHE", str(tmp_path))
    assert run_child("native", 3, SMOKE)["kernels"] == f"native ({platform.machine()})"
