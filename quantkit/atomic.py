"""Outputs appear under their final name only when complete.

Each output is written to a unique temporary name in the same directory (so the final rename is
atomic on POSIX) and renamed on success; on error or interrupt the temporary is removed. Unique
names (pid + random) keep two concurrent quantkit processes from writing into each other's file.
Shared caches (the demo model, the validation reference) are built under an exclusive file lock
(``file_lock``), so a second process waits for the first and then reuses its entry instead of
building it again or replacing it while the first still reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from quantkit.errors import OutputExistsError

try:
    import fcntl
except ImportError:  # not POSIX: no advisory locks; unique temporaries still keep files whole
    fcntl = None  # type: ignore[assignment]

_LIVE: set[Path] = set()  # temporaries of this process, removed by the CLI's signal handler


def temp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.part")


def check_writable(final: Path, *, force: bool) -> None:
    if final.exists() and not force:
        raise OutputExistsError(f"{final}: already exists", "pass --force to overwrite it")
    if final.exists() and final.is_dir():
        raise OutputExistsError(f"{final}: is a directory", "choose another output name")
    parent = final.parent
    while not parent.exists():  # created later, only once the preflight has passed
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputExistsError(
            f"{parent}: cannot create files there", "choose another output directory"
        )


@contextlib.contextmanager
def output_dirs(paths: list[Path]) -> Iterator[None]:
    """Create the parents of ``paths``; remove the ones created here if the block fails empty."""
    created: list[Path] = []
    for p in paths:
        missing = []
        d = p.parent
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            d.mkdir()
            created.append(d)
    try:
        yield
    except BaseException:
        for d in reversed(created):
            with contextlib.suppress(OSError):
                d.rmdir()  # only if empty
        raise


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    _LIVE.discard(path)


@contextlib.contextmanager
def atomic_output(final: Path, *, force: bool = False) -> Iterator[Path]:
    """Yield a temporary path; rename it to ``final`` if the block succeeds, else delete it."""
    check_writable(final, force=force)
    tmp = temp_name(final)
    _LIVE.add(tmp)
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(tmp)
        os.replace(tmp, final)
        _LIVE.discard(tmp)
    finally:
        if tmp in _LIVE:
            remove(tmp)


def cleanup_all() -> None:
    """Remove every temporary this process still holds (signal handlers call this)."""
    for p in list(_LIVE):
        remove(p)


@contextlib.contextmanager
def scratch_file(near: Path) -> Iterator[Path]:
    """A temporary file next to ``near`` that is always removed (e.g. a base GGUF to quantize)."""
    tmp = temp_name(near)
    _LIVE.add(tmp)
    try:
        yield tmp
    finally:
        remove(tmp)


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a new empty folder next to ``final``; on success it replaces ``final`` (a stale or
    broken entry is removed first), else it is deleted. Callers sharing ``final`` with other
    processes hold ``file_lock`` around this."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_name(final)
    tmp.mkdir()
    _LIVE.add(tmp)
    try:
        yield tmp
        if final.exists() or final.is_symlink():
            remove(final)
        os.replace(tmp, final)
        _LIVE.discard(tmp)
    finally:
        if tmp in _LIVE:
            remove(tmp)


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if absent, never deleted: deleting a
    lock file lets a third process lock a different inode). The kernel releases it if the process
    dies, so a killed run never leaves the cache locked."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def check_writable_dir(final: Path, *, force: bool) -> None:
    """Like ``check_writable`` for an output that is a directory (an HF checkpoint folder)."""
    if final.exists() and not force:
        raise OutputExistsError(f"{final}: already exists", "pass --force to overwrite it")
    if final.exists() and not final.is_dir():
        raise OutputExistsError(f"{final}: is a file", "choose another output name")
    parent = final.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise OutputExistsError(
            f"{parent}: cannot create files there", "choose another output directory"
        )


@contextlib.contextmanager
def atomic_output_dir(final: Path, *, force: bool = False) -> Iterator[Path]:
    """For a user-facing output folder (unlike ``atomic_dir``, for cache entries): yield a
    temporary directory path (not created); rename it to ``final`` if the block
    succeeds (replacing an existing ``final`` only with ``force``), else delete it."""
    check_writable_dir(final, force=force)
    tmp = temp_name(final)
    _LIVE.add(tmp)
    try:
        yield tmp
        if not tmp.is_dir():
            raise FileNotFoundError(tmp)
        if final.exists():  # force: move the old one aside, then drop it once the new is in place
            old = temp_name(final)
            _LIVE.add(old)
            os.replace(final, old)
            os.replace(tmp, final)
            remove(old)
        else:
            os.replace(tmp, final)
        _LIVE.discard(tmp)
    finally:
        if tmp in _LIVE:
            remove(tmp)


# -- JSON caches and result files ------------------------------------------------------------


def write_json(path: Path, obj: Any, *, pretty: bool = False) -> None:
    """``obj`` as JSON at ``path``, whole or absent: a reader (another process polling for a
    result, or reading a cache) never sees half a file. ``pretty``: indented, sorted keys."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(obj, indent=2, sort_keys=True) + "\n" if pretty else json.dumps(obj)
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def read_cached_json(path: Path) -> Any | None:
    """The JSON at ``path``; None when absent or unreadable (a damaged cache entry is made
    again, never an error)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def cached_json(path: Path, make: Callable[[], Any], *, use_cache: bool = True) -> tuple[Any, bool]:
    """What ``make()`` returns, kept as JSON at ``path``: read from there when present, else made
    under a lock beside it (a second process asking for the same entry waits, then reads it)
    and written whole. Returns (value, True when it came from the cache); ``use_cache=False``:
    made and not kept."""
    if not use_cache:
        return make(), False
    hit = read_cached_json(path)
    if hit is not None:
        return hit, True
    with file_lock(path.with_name(f".{path.stem}.lock")):
        hit = read_cached_json(path)  # another process made it meanwhile
        if hit is not None:
            return hit, True
        value = make()
        write_json(path, value)
        return value, False
