"""Data kinds as plug-ins (embedded scenes, COCO, Cityscapes, a folder of images and masks): see
:mod:`experiments.datasets.registry`."""

from .registry import DEFAULT_KIND, DataKind, get_kind, kind_names, kind_of, kinds, register, unregister

__all__ = ["DEFAULT_KIND", "DataKind", "get_kind", "kind_names", "kind_of", "kinds", "register", "unregister"]
