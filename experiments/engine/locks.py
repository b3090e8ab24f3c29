"""File locks: serialised sqlite store set-up, and claims so that one config is trained once at a time.

Both use ``fcntl.flock`` on a lock file. The kernel drops a flock when its process dies (SIGKILL included), so a
dead owner never blocks anyone: that is the stale-claim rule.
"""

from __future__ import annotations

import fcntl
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Seconds a process waits for another one's claim on the same stage before giving up (env overrides).
CLAIM_TIMEOUT_ENV_VAR = "MASKD_BENCH_CLAIM_TIMEOUT"
DEFAULT_CLAIM_TIMEOUT = 6 * 3600.0


class ClaimTimeout(RuntimeError):
    """Another process held a stage's claim for longer than the timeout."""


def claim_timeout() -> float:
    value = os.environ.get(CLAIM_TIMEOUT_ENV_VAR)
    return float(value) if value else DEFAULT_CLAIM_TIMEOUT


@contextmanager
def file_lock(
    path: Path, timeout: float | None = None, waiting: str | None = None, poll: float = 0.2
) -> Iterator[bool]:
    """Hold an exclusive flock on ``path`` (created if needed) for the block.

    Yields False when it was free at once and True when the block had to wait for another holder (who may have
    done the work meanwhile). ``waiting`` is printed once to stderr when it has to wait. Raises
    :class:`ClaimTimeout` after ``timeout`` seconds (None: wait for ever)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    waited = False
    try:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not waited and waiting:
                    print(waiting, file=sys.stderr, flush=True)
                waited = True
                if deadline is not None and time.monotonic() > deadline:
                    raise ClaimTimeout(
                        f"{path.name}: still held by another process after {timeout:.0f} s "
                        f"(raise {CLAIM_TIMEOUT_ENV_VAR} to wait longer)"
                    ) from None
                time.sleep(poll)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for people looking
        except OSError:
            pass
        yield waited
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI; None for any other store (http, postgres...)."""
    if not uri.startswith("sqlite:///"):
        return None
    rest = uri[len("sqlite:///") :].split("?", 1)[0]
    if not rest or rest == ":memory:":
        return None
    return Path(rest).expanduser().resolve()


@contextmanager
def store_setup_lock(uri: str) -> Iterator[None]:
    """Serialise creating/migrating a sqlite store: ``<db>.lock`` beside the file. Nothing for other stores."""
    db = sqlite_path(uri)
    if db is None:
        yield
        return
    with file_lock(db.with_name(db.name + ".lock")):
        yield


__all__ = ["ClaimTimeout", "claim_timeout", "file_lock", "sqlite_path", "store_setup_lock"]
