"""A worker process given one JSON job: started in its own session, watched, stopped.

Engine workers (validate/worker.py, validate/vllm_worker.py) and the llm-compressor worker
(quantize/vllm/llmc_worker.py) share one protocol: the job is ``job.json`` in a work folder, the worker
appends ``stage done total`` lines to ``progress`` there and writes ``result.json`` last. This
module starts the process (in a new session, so that a kill takes its children too), polls the
progress file while it waits, forwards each new line to the caller's ``progress`` (and, as a
heartbeat, the latest one again on every poll), and stops it on a timeout or when the caller's
``stop`` check says so. What the result means stays with the caller.
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.proc import kill_group
from quantkit.progress import Progress

JOB_FILE = "job.json"
PROGRESS_FILE = "progress"
RESULT_FILE = "result.json"
LOG_FILE = "worker.log"

# Poll often at first (a budget of seconds is enforced close to when it passes), then every half
# second: the interval grows by a tenth of the elapsed time from 50 ms to POLL_S.
POLL_FIRST_S = 0.05
POLL_S = 0.5


@dataclass
class ProgressLines:
    """What a worker's progress file says so far (``stage done total`` lines, appended)."""

    stage: str = "starting"
    done: int = 0
    total: int = 1
    seen: int = 0  # complete lines read
    first_seen: dict[str, float] = field(default_factory=dict)  # stage → monotonic time

    def read(self, path: Path, now: float) -> list[tuple[str, int, int]]:
        """The lines added since the last read (a line still being written is left for later)."""
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        new = []
        for ln in lines[self.seen :]:
            parts = ln.split()
            if len(parts) != 3:
                break
            stage, done, total = parts[0], int(parts[1]), int(parts[2])
            self.seen += 1
            self.stage, self.done, self.total = stage, done, total
            self.first_seen.setdefault(stage, now)
            self.line(stage, done, total, now)
            new.append((stage, done, total))
        return new

    def line(self, stage: str, done: int, total: int, now: float) -> None:
        """Called for every new line; subclasses keep what they need of it."""


@dataclass
class Finished:
    rc: int | None  # the exit status (negative: the signal), after a kill included
    stopped: str | None = None  # why it was stopped: the timeout or the caller's ``stop`` check
    timed_out: bool = False


def run_job(
    command: list[str],
    job: dict[str, Any],
    workdir: Path,
    *,
    timeout: float,
    env: Mapping[str, str],
    progress: Progress | None = None,
    label: str = "",
    units: Mapping[str, int] | None = None,
    heartbeat: bool = True,
    watch: ProgressLines | None = None,
    stop: Callable[[float, float], str | None] | None = None,
    log_to_terminal: bool = False,
) -> Finished:
    """Write ``job`` to ``workdir/job.json``, run ``command`` (which names that file) and wait.

    Output goes to ``workdir/worker.log`` (to the terminal with ``log_to_terminal``). Progress is
    forwarded as ``"{label} {stage}"`` (just the stage without a label), counts multiplied by
    ``units[stage]``. ``stop(now, t0)`` (monotonic times) is asked on every poll; a reason it
    returns stops the process, as does ``timeout`` seconds. An interruption (Ctrl-C, SIGTERM)
    kills the process group before it propagates."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / JOB_FILE).write_text(json.dumps(job))
    w = watch if watch is not None else ProgressLines()
    units = units or {}
    stopped: str | None = None
    timed_out = False
    with (workdir / LOG_FILE).open("wb") as lf:
        proc = subprocess.Popen(
            command,
            stdout=None if log_to_terminal else lf,
            stderr=None if log_to_terminal else subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(env),
            start_new_session=True,
        )
        t0 = time.monotonic()
        rc: int | None = None
        try:
            while rc is None:
                wait = min(POLL_S, POLL_FIRST_S + (time.monotonic() - t0) / 10)
                try:
                    rc = proc.wait(timeout=max(0.001, min(wait, t0 + timeout - time.monotonic())))
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                new = w.read(workdir / PROGRESS_FILE, now)
                if progress is not None:
                    if not new and heartbeat:
                        new = [(w.stage, w.done, w.total)]
                    for stage, done, total in new:
                        scale = units.get(stage, 1)
                        progress(
                            f"{label} {stage}" if label else stage, done * scale, total * scale
                        )
                if rc is not None:
                    break
                if now - t0 >= timeout:
                    stopped, timed_out = f"timed out after {timeout:g} s", True
                elif stop is not None:
                    stopped = stop(now, t0)
                if stopped:
                    kill_group(proc)
                    rc = proc.returncode
        except BaseException:
            kill_group(proc)  # the worker is in its own session: nothing of it is left running
            raise
    return Finished(rc, stopped, timed_out)


def read_result(workdir: Path) -> dict[str, Any] | None:
    """The worker's ``result.json``, None when it wrote none."""
    f = workdir / RESULT_FILE
    return json.loads(f.read_text()) if f.is_file() else None
