"""Weights from files: a model config's ``weights`` (a whole trained model) and ``backbone_weights`` (ImageNet).

A value is a file path, or a torchvision weights name such as ``ResNet50_Weights.IMAGENET1K_V1``, which names the
file torchvision would have downloaded into the torch hub cache (``torch.hub.get_dir()/checkpoints/<file name of
the weights' url>``). Nothing is downloaded here: a missing file is an error that names the path expected.

Every file is read with ``torch.load(path, map_location="cpu", weights_only=True)``. A file holds a bare state
dict (torchvision's files, :func:`experiments.engine.export.export_student`'s) or a dict with a ``state_dict``
(mmcv/mmdet checkpoints) or ``model`` entry; a ``module.`` prefix on every key (a DDP model's) is dropped.

Loading is strict. ``backbone_weights`` must fit the backbone body exactly, except the parts of an ImageNet file
the body does not have: a ResNet's ``fc.*`` (and a stage the FPN does not use), a MobileNetV2's ``classifier.*``
and last 1x1 conv ``features.18.*`` (its ``features.`` prefix is dropped). ``weights`` must fit the whole model.
``num_batches_tracked`` counters are optional both ways (FrozenBatchNorm2d has none). Anything else, a missing
key, an unexpected one or a shape that differs (a file of another architecture), is a :class:`WeightsError` of
one line naming the file and the first offending keys.

:func:`check_weights` finds the same problems without building the model for real (it builds it on the ``meta``
device, which allocates nothing), for manifest validation before any work; :func:`weight_file_digests` gives
the content hash of each file for stage hashes.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from .models import (
    MOBILENET_V2_LAST,
    DetectorConfig,
    SegmenterConfig,
    build_architecture,
)

__all__ = [
    "WEIGHT_FIELDS",
    "WeightsError",
    "apply_weights",
    "check_weights",
    "load_state_dict_file",
    "resolve_weights",
    "weight_file_digests",
]

#: The config fields that name weight files, in the order build_model applies them.
WEIGHT_FIELDS = ("backbone_weights", "weights")

#: ``<Enum>_Weights.<MEMBER>``, torchvision's weights names (``torchvision.models.get_weight``).
TORCHVISION_NAME = re.compile(r"^[A-Za-z0-9_]+_Weights\.[A-Za-z0-9_]+$")

#: How many offending keys a message lists.
SHOWN = 3


class WeightsError(ValueError):
    """A weight file that cannot be used; the message is one line naming the file (and keys)."""


ModelConfig = DetectorConfig | SegmenterConfig


# ------------------------------------------------------------------------------------------ files
def resolve_weights(spec: str) -> Path:
    """The file ``spec`` names: a path, or a torchvision weights name resolved in the torch hub cache.

    Raises :class:`WeightsError` when the file is not there (nothing is downloaded).
    """
    if not spec:
        raise WeightsError("empty weights value (leave the field out instead)")
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if TORCHVISION_NAME.match(spec):
        import torchvision

        try:
            weight = torchvision.models.get_weight(spec)
        except (KeyError, ValueError, AttributeError) as exc:
            raise WeightsError(f"{spec}: not a torchvision weights name ({type(exc).__name__}: {exc})") from None
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weight.url).path).name
        if not cached.is_file():
            raise WeightsError(
                f"{spec}: expected the file {cached} (torchvision's {weight.url} in the torch hub cache); "
                "nothing is downloaded here: copy the file there, or give a path instead"
            )
        return cached
    raise WeightsError(f"weights file {path} not found")


def load_state_dict_file(path: str | Path) -> dict[str, Tensor]:
    """The state dict in ``path`` (``torch.load(..., weights_only=True)`` on the CPU), unwrapped from a
    ``state_dict``/``model`` entry and a ``module.`` prefix. Raises :class:`WeightsError`."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same one-line error
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise WeightsError(f"{path}: torch.load(weights_only=True) refused it: {first}") from None
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise WeightsError(f"{path}: holds a {type(obj).__name__}, not a state dict (name -> tensor)")
    not_tensors = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, Tensor)]
    if not_tensors:
        raise WeightsError(f"{path}: not a state dict: entries {not_tensors[:SHOWN]} are not tensors")
    state = dict(obj)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state


def _digest(path: Path) -> str:
    stat = path.stat()
    key = (str(path.resolve()), stat.st_mtime_ns, stat.st_size)
    if key not in _DIGESTS:
        sha = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                sha.update(chunk)
        _DIGESTS[key] = sha.hexdigest()
    return _DIGESTS[key]


_DIGESTS: dict[tuple[str, int, int], str] = {}


def weight_file_digests(cfg: ModelConfig) -> dict[str, str]:
    """``{field: sha256 of its file}`` for every weight field ``cfg`` sets (empty when none): what a stage hash
    needs, since the path alone does not say what the file holds. Remembered per (path, mtime, size)."""
    return {name: _digest(resolve_weights(getattr(cfg, name))) for name in WEIGHT_FIELDS if getattr(cfg, name, "")}


# ------------------------------------------------------------------------------------------ fitting
def _backbone_body(model: nn.Module, cfg: ModelConfig) -> tuple[str, nn.Module]:
    """(dotted name, module) of the backbone body that ``backbone_weights`` initialise."""
    name = "backbone.body" if isinstance(cfg, DetectorConfig) else "backbone"
    return name, model.get_submodule(name)


def _body_key_map(cfg: ModelConfig, body_children: set[str]) -> Callable[[str], str | None]:
    """File key -> body key, or None for the parts of an ImageNet file the body leaves out."""
    if isinstance(cfg, SegmenterConfig) and cfg.backbone == "mobilenet_v2":

        def mobilenet(key: str) -> str | None:
            key = key.removeprefix("features.")
            head = key.split(".", 1)[0]
            if head == "classifier" or (head.isdigit() and int(head) > MOBILENET_V2_LAST):
                return None
            return key

        return mobilenet
    # a torchvision ResNet: its classifier, and any stage the IntermediateLayerGetter dropped (an FPN on
    # layer1..3 only), are not in the body
    resnet_children = {"conv1", "bn1", "layer1", "layer2", "layer3", "layer4", "fc", "avgpool"}
    left_out = resnet_children - body_children

    def resnet(key: str) -> str | None:
        return None if key.split(".", 1)[0] in left_out else key

    return resnet


def _is_counter(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def _problems(label: str, own: Mapping[str, Tensor], given: Mapping[str, Tensor], target: str) -> str | None:
    """One line describing why ``given`` does not fit ``own`` (the target's state dict), or None."""
    missing = [k for k in own if k not in given and not _is_counter(k)]
    unexpected = [k for k in given if k not in own and not _is_counter(k)]
    mismatched = [
        f"{k}: file {list(given[k].shape)} vs model {list(own[k].shape)}"
        for k in given
        if k in own and tuple(given[k].shape) != tuple(own[k].shape)
    ]
    if not (missing or unexpected or mismatched):
        return None
    parts = []
    for what, items, sep in (
        ("missing keys", missing, ", "),
        ("unexpected keys", unexpected, ", "),
        ("shape mismatches", mismatched, "; "),
    ):
        if items:
            more = f"{sep}..." if len(items) > SHOWN else ""
            parts.append(f"{len(items)} {what} ({sep.join(items[:SHOWN])}{more})")
    hint = " (a file of another architecture or width?)" if unexpected or mismatched else ""
    return f"{label} does not fit {target}: {', '.join(parts)}{hint}"


def _describe(cfg: ModelConfig) -> str:
    arch = f"{cfg.arch} {cfg.backbone}"
    return f"{arch} width {cfg.width}" if cfg.width != 64 else arch


def _fit(model: nn.Module, cfg: ModelConfig, field: str, path: Path, state: dict[str, Tensor]) -> tuple:
    """(target module, the state to load into it), or raises WeightsError."""
    label = f"{field} {path}"
    if field == "weights":
        target, own, name = model, model.state_dict(), "the model"
    else:
        name, target = _backbone_body(model, cfg)
        own = target.state_dict()
        key_map = _body_key_map(cfg, {n for n, _ in target.named_children()})
        mapped = {}
        for key, value in state.items():
            new = key_map(key)
            if new is not None:
                mapped[new] = value
        state = mapped
        name = f"the backbone body ({name})"
    problem = _problems(label, own, state, f"{name} of {_describe(cfg)}")
    if problem:
        raise WeightsError(problem)
    return target, {k: v for k, v in state.items() if k in own}


def apply_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Load ``cfg.backbone_weights`` into the backbone body, then ``cfg.weights`` into ``model`` (strict, see the
    module docstring). Called by :func:`experiments.engine.models.build_model`."""
    for field in WEIGHT_FIELDS:
        spec = getattr(cfg, field)
        if not spec:
            continue
        path = resolve_weights(spec)
        target, state = _fit(model, cfg, field, path, load_state_dict_file(path))
        # strict=False only because num_batches_tracked may be absent from either side; every other key was
        # checked above. A state dict without _metadata lets BatchNorm keep its own counter.
        target.load_state_dict(state, strict=False)


def check_weights(cfg: ModelConfig) -> list[str]:
    """Every problem ``cfg``'s weight files have (one line each, naming the file): not found, unreadable, or not
    fitting the model (missing/unexpected keys, shapes). Reads each file once and builds the model on the
    ``meta`` device only, so it is cheap enough for manifest validation. Empty when there is nothing to load."""
    problems: list[str] = []
    if not any(getattr(cfg, field, "") for field in WEIGHT_FIELDS):
        return problems
    with torch.device("meta"):
        model = build_architecture(cfg)
    for field in WEIGHT_FIELDS:
        spec = getattr(cfg, field)
        if not spec:
            continue
        try:
            path = resolve_weights(spec)
            _fit(model, cfg, field, path, load_state_dict_file(path))
        except WeightsError as exc:
            problems.append(f"{field}: {exc}")
    return problems
