"""Access to libllama through llama-cpp-python, with llama.cpp's log captured.

llama.cpp logs to stderr through a callback; quantkit keeps the last lines in memory (to put the
engine's own words into an error message) and forwards them only with QUANTKIT_DEBUG=1.
"""

from __future__ import annotations

import collections
import contextlib
import ctypes
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

from quantkit.errors import EngineError

_LOG: collections.deque[str] = collections.deque(maxlen=2000)
_LISTENERS: list[Callable[[str], None]] = []  # get every raw fragment (progress parsing)
_CALLBACK: Any = None  # keep a reference: ctypes callbacks die with their Python object
_lib: ModuleType | None = None


def llama_cpp() -> ModuleType:
    """Import llama_cpp once and route its log through quantkit."""
    global _lib, _CALLBACK
    if _lib is not None:
        return _lib
    check_build()
    try:
        import llama_cpp as lib
    except ImportError as e:
        raise EngineError(
            f"llama-cpp-python is not importable ({e})",
            "run scripts/install.sh, which builds it for this CPU",
        ) from None
    debug = os.environ.get("QUANTKIT_DEBUG") == "1"
    partial: list[str] = []

    @lib.llama_log_callback
    def _cb(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        s = text.decode("utf-8", "replace")
        if debug:
            sys.stderr.write(s)
        for fn in _LISTENERS:
            fn(s)
        partial.append(s)
        if s.endswith("\n"):
            _LOG.append("".join(partial).rstrip())
            partial.clear()

    _CALLBACK = _cb
    lib.llama_log_set(_cb, ctypes.c_void_p(0))
    lib.llama_backend_init()
    _lib = lib
    return lib


def check_build() -> None:
    """Refuse a llama.cpp built for another CPU (a venv carried to a machine with other ISA
    flags would die with "Illegal instruction" or take the crashing AMX path; docs/decisions.md)."""
    from quantkit.buildflags import flags_key

    marker = Path(sys.prefix) / ".llama-cpp-flags"
    if not marker.is_file():
        return  # not installed by scripts/install.sh; nothing recorded to compare
    built = marker.read_text().strip().rpartition("-")[2]
    if built != flags_key():
        raise EngineError(
            "llama-cpp-python in this environment was built for a CPU with other instruction sets",
            "run scripts/install.sh again: it builds llama.cpp for this CPU",
        )


@contextlib.contextmanager
def log_listener(fn: Callable[[str], None]) -> Iterator[None]:
    """Call ``fn`` with every fragment llama.cpp logs while the block runs."""
    _LISTENERS.append(fn)
    try:
        yield
    finally:
        _LISTENERS.remove(fn)


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM during a long libllama call that logs through the Python callback.

    A Python signal handler runs at the next Python bytecode, which is inside the log callback;
    the exception it raises (KeyboardInterrupt, quantkit's Interrupted) is swallowed by ctypes
    ("Exception ignored on calling ctypes callback function") and the interruption is lost, so
    the run would go on. Here the first signal is only recorded and the previous handler is
    called when the C call returns, so the interruption surfaces at a point where Python can
    unwind (atomic outputs removed). A second signal gets the system's default action: the
    process ends at once (no output under a final name: those appear only by rename).
    llama_model_quantize has no abort hook, so the first signal waits for the current file.
    """
    names = (signal.SIGINT, signal.SIGTERM)
    if threading.current_thread() is not threading.main_thread():
        yield  # handlers can only be set from the main thread, where they run anyway
        return
    old = {s: signal.getsignal(s) for s in names}
    pending: list[int] = []

    def hold(signum: int, _frame: Any) -> None:
        pending.append(signum)
        for s in names:
            signal.signal(s, signal.SIG_DFL)  # a second signal ends the process now

    for s in names:
        if callable(old[s]):  # a Python handler (default_int_handler, the CLI's SIGTERM one)
            signal.signal(s, hold)
    try:
        yield
    finally:
        for s in names:
            signal.signal(s, old[s])
        if pending:
            h = old[pending[0]]
            if callable(h):
                h(pending[0], None)


def recent_log(n: int = 20, *, errors_only: bool = False) -> list[str]:
    lines = [ln for ln in _LOG if ln.strip()]
    if errors_only:
        picked = [ln for ln in lines if "error" in ln.lower() or "failed" in ln.lower()]
        lines = picked or lines
    return lines[-n:]


def clear_log() -> None:
    _LOG.clear()


def version() -> str:
    try:
        from importlib.metadata import version as v

        return v("llama-cpp-python")
    except Exception:  # not installed as a distribution
        return "unknown"
