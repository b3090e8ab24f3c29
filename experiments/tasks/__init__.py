"""Tasks as plug-ins (detection, segmentation): see :mod:`experiments.tasks.registry`."""

from .registry import Task, get_task, register, tasks

__all__ = ["Task", "get_task", "register", "tasks"]
