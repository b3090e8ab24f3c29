"""Checkpoint files: written atomically, checked by sha256, loaded with ``weights_only=True`` only.

A checkpoint that does not match its recorded sha256 or cannot be loaded raises :class:`CheckpointError`, whose
message never suggests ``weights_only=False``. :class:`ResumeCheckpoints` keeps a training stage's last resume
checkpoints (weights, optimizer, RNG states, data position) and finds the newest good one.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


class CheckpointError(RuntimeError):
    """A checkpoint file is corrupt, truncated, refused by ``torch.load(weights_only=True)`` or of the wrong shape."""


_WEIGHTS_ONLY_ADVICE = [
    # torch's advice to rerun with weights_only=False (arbitrary code execution): never repeated to a user.
    re.compile(r"\(?\d\)?\s*Re-running `torch\.load` with `weights_only` set to `False`.*?(?:source\.|$)", re.S),
    re.compile(r"Re-running `torch\.load` with `weights_only` set to `False`.*?(?:source\.|$)", re.S),
    re.compile(r"[^.\n]*weights_only\s*=\s*False[^.\n]*\.?"),
    re.compile(r"[^.\n]*`weights_only` set to `False`[^.\n]*\.?"),
]


def clean_torch_message(message: str) -> str:
    """``message`` without torch's suggestion to load with ``weights_only=False`` (or to allow-list the
    file's classes), on one line."""
    message = re.sub(r"\x1b\[[0-9;]*m", "", message)
    if "Weights only load failed" in message:
        found = re.search(r"WeightsUnpickler error:\s*(.*?)(?:\.\s|\n|$)", message, re.S)
        reason = found.group(1).strip() if found else "the file holds more than tensors"
        message = f"refused by torch.load(weights_only=True): {reason}"
    for pattern in _WEIGHTS_ONLY_ADVICE:
        message = pattern.sub("", message)
    message = re.sub(r"Check the documentation of torch\.load.*", "", message, flags=re.S)
    message = re.sub(r"\s*\n\s*", " ", message)
    message = re.sub(r"\s{2,}", " ", message)
    return message.strip(" :;")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_atomic(state: dict[str, Any], path: Path) -> str:
    """Write ``state`` to ``path`` through a unique temporary file in the same directory and ``os.replace`` (no
    reader ever sees half a file, two writers never share a temporary file); returns the file's sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        digest = sha256_file(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    write_text_atomic(sidecar(path), digest + "\n")
    return digest


def write_text_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sidecar(path: Path) -> Path:
    """``<checkpoint>.sha256``: the digest written with the file (checked when no run records one)."""
    return path.with_name(path.name + ".sha256")


def load_checked(path: Path, expected_sha256: str | None = None) -> dict[str, torch.Tensor]:
    """Load ``path`` with ``weights_only=True`` after checking its sha256 (``expected_sha256``, else the
    sidecar's if there is one); raises :class:`CheckpointError` with a one-line reason."""
    state = _load(path, expected_sha256)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def _load(path: Path, expected_sha256: str | None) -> Any:
    expected = expected_sha256
    if expected is None and sidecar(path).is_file():
        expected = sidecar(path).read_text().strip() or None
    if expected is not None:
        actual = sha256_file(path)
        if actual != expected:
            raise CheckpointError(f"{path}: sha256 {actual[:12]}… does not match the recorded {expected[:12]}…")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle refusals, truncated zip archives, EOF...
        raise CheckpointError(
            f"{path}: cannot be loaded ({clean_torch_message(str(exc)) or type(exc).__name__})"
        ) from None
    return state


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
    sidecar(path).unlink(missing_ok=True)


class ResumeCheckpoints:
    """The resume checkpoints of one training stage: ``folder/step-00000012.pt`` (the state after 12 optimizer
    steps, a nested dict of tensors and plain values), each written atomically with its sha256 beside it; the
    last ``keep`` are kept."""

    PATTERN = re.compile(r"step-(\d+)\.pt")

    def __init__(self, folder: Path, keep: int = 2) -> None:
        self.folder = folder
        self.keep = keep

    def paths(self) -> list[Path]:
        """The checkpoint files, newest (most steps) first."""
        if not self.folder.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.folder.iterdir() if (m := self.PATTERN.fullmatch(p.name))]
        return [p for _, p in sorted(found, reverse=True)]

    def save(self, state: dict[str, Any], step: int) -> Path:
        path = self.folder / f"step-{step:08d}.pt"
        save_atomic(state, path)
        for old in self.paths()[self.keep :]:
            remove(old)
        return path

    def latest(self, say: Callable[[str], None]) -> tuple[dict[str, Any], Path] | None:
        """The newest checkpoint that passes its sha256 and loads with ``weights_only=True``; each one that does
        not is named in one line (``say``) and the previous one is tried."""
        for path in self.paths():
            try:
                state = _load(path, None)
                if not isinstance(state, dict) or "step" not in state:
                    raise CheckpointError(f"{path}: not a resume checkpoint")
                return state, path
            except CheckpointError as exc:
                say(f"resume: skipped a corrupt checkpoint: {exc}")
        return None

    def clear(self) -> None:
        for path in self.paths():
            remove(path)
        if self.folder.is_dir():
            for leftover in self.folder.glob(".step-*.tmp"):  # a writer killed mid-write
                leftover.unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass


__all__ = [
    "CheckpointError",
    "ResumeCheckpoints",
    "clean_torch_message",
    "load_checked",
    "remove",
    "save_atomic",
    "sha256_file",
    "sidecar",
]
