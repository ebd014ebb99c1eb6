"""One writer per cache: a lock file holding the writer's pid; a dead pid's lock is taken over."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from pathlib import Path

from .errors import CacheError


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


_HELD: set[str] = set()   # locks this process took: one naming our pid but not here is a dead process's (a
                          # restarted container has the same pid and host name)


def _ours(path: Path, holder: dict) -> bool:
    """Whether `holder` is this very process holding `path` (not an earlier process that had our pid)."""
    return (int(holder.get("pid", -1)) == os.getpid() and holder.get("host") == socket.gethostname()
            and os.path.abspath(path) in _HELD)


def _try_create(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, fh)
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as err:   # a full disk: no empty lock left behind to refuse the re-run
        with contextlib.suppress(OSError):
            os.unlink(path)
        err.filename = err.filename or str(path)
        raise
    return True


def read_holder(path: Path) -> dict | None:
    """The lock file's {pid, host}, or None while it is unreadable (being written)."""
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def acquire_lock(path: Path) -> Path:
    """Create the lock file, or take over one whose process (on this host) is gone; returns its path."""
    for _ in range(3):
        if _try_create(path):
            _HELD.add(os.path.abspath(path))
            return path
        holder = read_holder(path)
        if holder is None:  # half-written or unreadable: only stale if it stays that way
            try:
                age_ok = os.path.getmtime(path) < time.time() - 5
            except OSError:
                continue
            if not age_ok:
                raise CacheError(f"cache lock {path}: being created by another process; try again")
        elif _ours(path, holder):
            raise CacheError(f"cache lock {path}: this process already has a writer open on this cache")
        clear_stale_lock(path, "another run", holder)
    raise CacheError(f"cache lock {path}: could not be taken (another process keeps creating it)")


def release_lock(path: Path) -> None:
    """Remove the lock file if this process holds it."""
    holder = read_holder(path)
    if holder and _ours(path, holder):
        _HELD.discard(os.path.abspath(path))
        with contextlib.suppress(OSError):
            os.unlink(path)


def clear_stale_lock(path: Path, what: str, holder: dict | None = None) -> None:
    """Remove a lock left by a dead process; CacheError naming `what` if its holder may still run."""
    holder = read_holder(path) if holder is None else holder
    if holder is not None:
        pid, host = int(holder.get("pid", -1)), holder.get("host")
        if host != socket.gethostname():
            raise CacheError(f"cache lock {path}: {what} (pid {pid} on host {host}) may still be writing this cache; "
                             f"if no run is, delete the lock file")
        if pid_alive(pid) and (pid != os.getpid() or _ours(path, holder)):
            raise CacheError(f"cache lock {path}: {what} (pid {pid}) is still writing this cache; wait for it, or "
                             f"stop it and re-run to resume")
    try:
        path.unlink(missing_ok=True)
    except OSError as err:
        raise CacheError(f"cache lock {path}: cannot remove stale lock: {err}") from None
