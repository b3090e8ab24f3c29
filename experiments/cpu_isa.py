"""One instruction set for the CPU kernels of every run, whatever x86-64 machine runs it.

PyTorch picks its CPU kernels at run time from what the processor offers: ATen's vectorised kernels (AVX2 or
AVX-512), oneDNN's convolutions (up to AVX-512 / AMX) and MKL's BLAS each take a different code path, and the
paths sum floating-point numbers in different orders. The same manifest then trains a slightly different teacher
on an AVX-512 machine than on an AVX2-only one, and every student distilled from it inherits the difference
(issue 9 measured 41.84 vs 39.50 mIoU for one segmentation teacher). Pinning the three libraries to AVX2, which
every x86-64 server of the last decade has, makes the choice the same everywhere.

The variables are read when each library first runs a kernel, so they are set when ``experiments`` is imported,
before any tensor work. A value already in the environment wins; ``MASKD_BENCH_CPU_ISA=native`` leaves the
libraries free (faster on AVX-512 machines, not comparable across machines). Runs record the pin as the tag
``cpu_kernels`` and the tables name it beside the torch version.
"""

from __future__ import annotations

import os
import platform

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
