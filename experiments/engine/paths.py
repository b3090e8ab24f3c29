"""Filesystem locations used by the benchmark: the repository root and the cache (scenes, checkpoints, claims)."""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable that overrides the cache location (tests point it at a tmp dir).
CACHE_ENV_VAR = "MASKD_BENCH_CACHE"


def repo_root() -> Path | None:
    """Return the repository root (the directory holding ``pyproject.toml``), or None.

    This file lives at ``<root>/experiments/engine/paths.py``, so only the directory above the ``experiments``
    package is checked. Walking further up could pick an unrelated project's ``pyproject.toml`` when the package is
    installed non-editable into a virtualenv that happens to sit inside some other project; in that case
    (``experiments`` inside ``site-packages``) the answer is None.
    """
    candidate = Path(__file__).resolve().parents[2]
    return candidate if (candidate / "pyproject.toml").is_file() else None


def cache_root() -> Path:
    """Return the cache directory, creating it if needed; never inside the repository.

    Resolution order: ``$MASKD_BENCH_CACHE`` if set and non-empty, else ``$XDG_CACHE_HOME/maskd-bench``, else
    ``~/.cache/maskd-bench``.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        root = Path(env).expanduser()
    else:
        xdg = os.environ.get("XDG_CACHE_HOME")
        base = Path(xdg).expanduser() if xdg and Path(xdg).expanduser().is_absolute() else Path.home() / ".cache"
        root = base / "maskd-bench"
    root.mkdir(parents=True, exist_ok=True)
    return root
