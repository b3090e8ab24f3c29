"""FeatureRecorder: forward hooks on named submodules that own their handles and fail loudly.

The most reported failure in distillation codebases is a recorder that silently records nothing (mmrazor
issue 339: a configured CWD loss never ran). This one raises when a name does not exist (at construction) and
when a named module did not run (on ``get`` and on leaving the ``with`` block).

    with FeatureRecorder(model, ["backbone.fpn"]) as rec:
        model(images)
        fpn = rec.get("backbone.fpn")        # what the module returned: a tensor, tuple or dict, as is
    assert not model.backbone.fpn._forward_hooks   # handles are removed on exit

Prefer the one-pass helpers in :mod:`experiments.engine.models` (``detector_train_step``, ``segmenter_forward``) for
training; the recorder is for models or modules those helpers do not cover, and for checking them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any, Self

from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle


def _detach(value: Any) -> Any:
    # Detach tensors inside the containers modules actually return (tensor, tuple/list, dict).
    if isinstance(value, Tensor):
        return value.detach()
    if isinstance(value, dict):
        return type(value)((key, _detach(item)) for key, item in value.items())
    if isinstance(value, tuple | list):
        return type(value)(_detach(item) for item in value)
    return value


class FeatureRecorder:
    """Record the outputs of named submodules of ``model`` through forward hooks.

    Args:
        model: the module whose submodules are hooked.
        names: dotted submodule names as in ``model.named_modules()`` (e.g. ``"backbone.fpn"``,
            ``"classifier"``). Duplicates are recorded once.
        detach: store detached outputs (for a teacher or for logging); default keeps the autograd graph.

    Raises:
        ValueError: a name is not a submodule of ``model`` (the message names it and the closest valid names).

    ``outputs[name]`` holds the output of the latest call of that module since the last :meth:`clear`
    (a module called several times in one forward keeps its last output; ``calls[name]`` counts them).
    """

    def __init__(self, model: nn.Module, names: Sequence[str], detach: bool = False) -> None:
        if isinstance(names, str):
            raise TypeError("names must be a sequence of module names, not a single string")
        modules = dict(model.named_modules())
        for name in names:
            if name not in modules or name == "":
                close = difflib.get_close_matches(name, [n for n in modules if n], n=5, cutoff=0.5)
                hint = f"; close names: {', '.join(close)}" if close else ""
                raise ValueError(f'"{name}" is not a submodule of {type(model).__name__}{hint}')
        self.names: tuple[str, ...] = tuple(dict.fromkeys(names))
        self.detach = detach
        self.outputs: dict[str, Any] = {}
        self.calls: dict[str, int] = {}
        self._handles: list[RemovableHandle] = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in self.names
        ]

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.outputs[name] = _detach(output) if self.detach else output
            self.calls[name] = self.calls.get(name, 0) + 1

        return hook

    def get(self, name: str) -> Any:
        """The recorded output of ``name``; RuntimeError if it has not fired since the last clear()."""
        if name not in self.names:
            raise KeyError(f'"{name}" is not recorded by this recorder; recorded: {", ".join(self.names)}')
        if name not in self.outputs:
            raise RuntimeError(f'"{name}" never fired since the last clear(): the forward did not call it')
        return self.outputs[name]

    def check_fired(self) -> None:
        """RuntimeError naming every hooked module that did not run since the last :meth:`clear`."""
        missing = [name for name in self.names if name not in self.outputs]
        if missing:
            quoted = ", ".join(f'"{name}"' for name in missing)
            raise RuntimeError(f"{quoted} never fired since the last clear(): the forward did not call them")

    def clear(self) -> None:
        """Forget recorded outputs (call between steps so stale features are never reused)."""
        self.outputs.clear()
        self.calls.clear()

    def remove(self) -> None:
        """Remove every hook handle; idempotent."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # Hooks are removed even if the check below raises, and an exception from the body wins over it.
        self.remove()
        if exc_type is None:
            self.check_fired()

    def __repr__(self) -> str:
        state = "active" if self._handles else "removed"
        return f"FeatureRecorder({list(self.names)}, {state}, fired={sorted(self.outputs)})"
