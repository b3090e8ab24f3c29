"""Distillation methods as plug-ins: one module per method, each registering a
:class:`~experiments.methods.registry.MethodSpec`. See the README section "Adding a method"."""

from .registry import (
    Distillation,
    DistillBatch,
    DistillContext,
    MethodSpec,
    get,
    method_names,
    methods,
    register,
    table_order,
)

__all__ = [
    "DistillBatch",
    "DistillContext",
    "Distillation",
    "MethodSpec",
    "get",
    "method_names",
    "methods",
    "register",
    "table_order",
]
