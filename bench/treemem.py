"""Run a command and report its wall time and the peak memory of its whole process tree.

    .venv/bin/python bench/treemem.py [--interval 0.2] -- COMMAND ARGS...

Every ``--interval`` seconds the tree (the command and all its descendants, found through
``/proc/*/stat`` parent ids) is sampled from ``/proc/PID/status``: the sum of ``VmRSS`` (resident,
file-backed mmap pages included) and of ``RssAnon`` (anonymous memory: what the OOM killer counts
and what swapless RAM must hold). The peaks of both sums are printed as one JSON line on stderr
after the command's own exit status. ``ru_maxrss`` (``/usr/bin/time -v``) gives only the largest
single process; vLLM and llm-compressor run several.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        # the command name may hold spaces and parentheses: fields start after the last ")"
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(pid))
    return kids


def tree(root: int) -> list[int]:
    kids = _children()
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def sample(root: int) -> tuple[int, int]:
    """(VmRSS, RssAnon) of the tree in bytes."""
    rss = anon = 0
    for pid in tree(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    rss += int(line.split()[1]) * 1024
                elif line.startswith("RssAnon:"):
                    anon += int(line.split()[1]) * 1024
        except OSError:
            continue
    return rss, anon


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("cmd", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    cmd = a.cmd[1:] if a.cmd[:1] == ["--"] else a.cmd
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd)
    stopped: list[int] = []

    def stop(signum: int, _frame: object) -> None:
        # a time limit (timeout -s TERM): pass it on and keep sampling until the command is gone,
        # so the peaks up to that point are still printed
        stopped.append(signum)
        proc.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    peak_rss = peak_anon = 0
    while proc.poll() is None:
        rss, anon = sample(proc.pid)
        peak_rss, peak_anon = max(peak_rss, rss), max(peak_anon, anon)
        time.sleep(a.interval)
    wall = time.perf_counter() - t0
    res = {
        "rc": proc.returncode,
        "wall_s": round(wall, 1),
        "peak_tree_rss_gib": round(peak_rss / 2**30, 3),
        "peak_tree_anon_gib": round(peak_anon / 2**30, 3),
        "load": os.getloadavg(),
        **({"stopped_by_signal": stopped[0]} if stopped else {}),
    }
    print(json.dumps(res), file=sys.stderr, flush=True)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
