"""The benchmark: manifests, stages, tables. Importing it pins the CPU kernels' instruction set
(:mod:`experiments.cpu_isa`) before any tensor work, so a run gives the same numbers on any x86-64 machine."""

from .cpu_isa import pin_cpu_kernels

pin_cpu_kernels()
