"""Memory: what a process used, what this machine offers, and what a step will need.

Peak resident memory is read from ``/proc/self/status`` (``VmHWM``, the high-water mark of this
process's own address space). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used for that: Linux
carries the high-water mark across ``fork`` + ``exec`` (``exec_mmap`` folds the old address
space's peak into ``signal->maxrss``), so a worker started from a big parent reports the parent's
peak as its own.
"""

from __future__ import annotations

import resource
from pathlib import Path

PROC_STATUS = Path("/proc/self/status")


def proc_status(path: Path = PROC_STATUS) -> dict[str, int]:
    """The ``kB`` fields of a ``/proc/<pid>/status`` file, in bytes (empty where unreadable)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def own_peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM``, or ``ru_maxrss`` where /proc is
    missing (not Linux)."""
    hwm = proc_status().get("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux units: KiB
