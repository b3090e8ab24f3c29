"""One instruction set for the CPU kernels of every run, whatever x86-64 machine runs it.

PyTorch picks its CPU kernels at run time from what the processor offers: ATen's vectorised kernels (AVX2 or
AVX-512), oneDNN's convolutions (up to AVX-512 / AMX) and MKL's BLAS each take a different code path, and the
paths sum floating-point numbers in different orders. The same manifest then trains a slightly different teacher
on an AVX-512 machine than on an AVX2-only one, and every student distilled from it inherits the difference
(issue 9 measured 41.84 vs 39.50 mIoU for one segmentation teacher). Pinning the three libraries to AVX2, which
every x86-64 server of the last decade has, makes the libraries' choice of code path the same everywhere.

That is not enough for the same bits on every x86-64 machine. Measured (``nox -s bench_cpu_isa`` against the
fingerprint in ``reports/cpu_isa_fingerprint.json``, and the committed tables' teachers retrained): pinned runs on
an Intel Xeon (AMX) and an AMD EPYC (AVX-512) differ from the second logged step on, and the embedded teachers
trained on the two came out 37.50 vs 33.73 test mAP and 52.71 vs 53.65 test mIoU. Likely causes, not isolated:
oneDNN sizes its blocking to the caches it finds, and MKL's reproducibility branches are guaranteed for Intel
processors only. Within one machine the pin keeps runs bit-identical, as they were without it.

The variables are read when each library first runs a kernel, so they are set when ``experiments`` is imported,
before any tensor work. A value already in the environment wins; ``MASKD_BENCH_CPU_ISA=native`` leaves the
libraries free (faster on AVX-512 machines, not comparable across machines). Runs record the pin as the tag
``cpu_kernels`` and the tables name it beside the torch version.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

OPT_OUT = "MASKD_BENCH_CPU_ISA"

#: library variable -> pinned value (documented names: ATen's ``ATEN_CPU_CAPABILITY``, oneDNN's
#: ``ONEDNN_MAX_CPU_ISA``, Intel MKL's conditional numerical reproducibility ``MKL_CBWR``)
PINS = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}


def pin_cpu_kernels() -> None:
    """Set the pins unless opted out or not on x86-64 (the variables mean nothing elsewhere)."""
    if os.environ.get(OPT_OUT, "").lower() == "native" or not _is_x86_64():
        return
    for name, value in PINS.items():
        os.environ.setdefault(name, value)


def _is_x86_64() -> bool:
    return platform.machine().lower() in ("x86_64", "amd64")


def cpu_kernels() -> str:
    """What this process's kernels are pinned to, for tags and tables: ``aten=avx2 onednn=AVX2 mkl=AVX2``, or
    ``native (<machine>)`` when nothing is pinned."""
    if not _is_x86_64():
        return f"native ({platform.machine()})"
    values = {name: os.environ.get(name) for name in PINS}
    if not any(values.values()):
        return f"native ({platform.machine()})"
    short = {"ATEN_CPU_CAPABILITY": "aten", "ONEDNN_MAX_CPU_ISA": "onednn", "MKL_CBWR": "mkl"}
    return " ".join(f"{short[name]}={value or 'native'}" for name, value in values.items())


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_vector_isa() -> str:
    """The widest vector extension the processor reports (avx512f, avx2, ...), from /proc/cpuinfo."""
    try:
        flags = next(x for x in Path("/proc/cpuinfo").read_text().splitlines() if x.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    for isa in ("amx_tile", "avx512f", "avx2", "avx", "sse4_2"):
        if isa in flags:
            return isa
    return "none"
