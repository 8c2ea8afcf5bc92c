"""One engine worker process, started and watched: progress with rate and ETA, a hard timeout, a
time budget, and what is kept when the process dies.

The worker (``validate/worker.py``, or a script engine such as ``validate/vllm_worker.py`` in its
own environment) appends ``stage done total`` lines to ``progress`` in its job folder — ``load``,
``score`` (chunks) and ``speed`` — writes ``scored.json`` once every chunk is scored (before the
speed run, whose failure must not lose the quality figures) and ``result.json`` last. The runner
reads those files while it waits; it never parses the engine's output except to quote the
engine's own last error line when the process dies without a result.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.proc import kill_group
from quantkit.progress import clock

LOG_TAIL_LINES = 25
# Poll often at first (a budget of seconds is enforced close to when it passes), then every half
# second: the interval grows by a tenth of the elapsed time from 50 ms to POLL_S.
POLL_FIRST_S = 0.05
POLL_S = 0.5
# A budget is also given up early when, after at least one scored chunk, the projected time is
# this many times the budget: the rate of later chunks does not recover such a gap (each chunk is
# the same amount of work), and waiting the whole budget out would only burn it.
HOPELESS_FACTOR = 2.0

Progress = Callable[[str, int, int], None]

# Lines that carry an engine's own error, newest wins (Python exceptions, C++ aborts, torch
# compiled-kernel asserts, the kernel's signal messages).
_ERROR_LINE = re.compile(
    r"(Error|Exception|error:|Assertion|assert|out of bounds|Illegal instruction|"
    r"Segmentation fault|terminate called|Aborted|what\(\)|not implemented)"
)


def log_tail(log: Path, n: int = LOG_TAIL_LINES) -> list[str]:
    try:
        lines = log.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        return []
    return [ln[:400] for ln in lines[-n:]]


def last_error_line(lines: list[str]) -> str | None:
    """The engine's own last error line in a log tail (else its last non-empty line)."""
    for ln in reversed(lines):
        if _ERROR_LINE.search(ln) and not ln.lstrip().startswith(("File ", "Traceback")):
            return ln.strip()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), None)


@dataclass
class _Watch:
    """What the progress file says of a running worker."""

    stage: str = "starting"
    done: int = 0
    total: int = 1
    chunks_done: int = 0
    chunks: int = 0
    score_t0: float | None = None  # monotonic time the first chunk started
    seen: int = 0

    def read(self, path: Path, now: float) -> list[tuple[str, int, int]]:
        try:
            lines = path.read_text().splitlines()
        except OSError:
            return []
        new = []
        for ln in lines[self.seen :]:
            parts = ln.split()
            if len(parts) != 3:
                break  # a line still being written
            stage, done, total = parts[0], int(parts[1]), int(parts[2])
            self.seen += 1
            self.stage, self.done, self.total = stage, done, total
            if stage == "score":
                self.chunks_done, self.chunks = done, total
                if self.score_t0 is None:
                    self.score_t0 = now
            new.append((stage, done, total))
        return new

    def projected(self, now: float, t0: float) -> float | None:
        """Projected seconds for the whole artifact (load + every chunk), from the chunks so far."""
        if self.score_t0 is None or self.chunks_done < 1:
            return None
        per_chunk = (now - self.score_t0) / self.chunks_done
        return (now - t0) + (self.chunks - self.chunks_done) * per_chunk


def _too_slow(w: _Watch, now: float, t0: float, budget: float, chunk_tokens: int) -> str:
    elapsed = now - t0
    limit = f"the {budget / 60:g}-minute budget"
    proj = w.projected(now, t0)
    if proj is None:
        return (
            f"too slow for {limit}: no chunk of {chunk_tokens} tokens scored in "
            f"{clock(elapsed)} (stage {w.stage}); below {chunk_tokens / elapsed:.3g} tokens/s"
        )
    assert w.score_t0 is not None
    rate = w.chunks_done * chunk_tokens / max(1e-9, now - w.score_t0)
    return (
        f"too slow for {limit}: {rate:.3g} tokens/s scoring ({w.chunks_done}/{w.chunks} chunks "
        f"in {clock(elapsed)}); projected {clock(proj)} for this artifact"
    )


def _worker_command(job: dict[str, Any], workdir: Path) -> list[str]:
    from quantkit.validate.engines import ENGINES, SCRIPT_ENGINES

    if job["engine"] in SCRIPT_ENGINES:
        from quantkit import envs

        se = SCRIPT_ENGINES[job["engine"]]
        return [str(envs.python(se.env)), str(se.script), str(workdir / "job.json")]
    python = ENGINES[job["engine"]].python or sys.executable
    return [python, "-m", "quantkit.validate.worker", str(workdir / "job.json")]


def run_worker(
    job: dict[str, Any],
    workdir: Path,
    timeout: float,
    progress: Progress | None,
    label: str,
    *,
    budget: float | None = None,
    chunk_tokens: int = 1,
) -> tuple[dict[str, Any], list[str]]:
    """Start one worker process for ``job`` and watch it; returns its result and the tail of its
    log (empty when it succeeded).

    ``timeout``: seconds after which the process is killed and the artifact fails. ``budget``:
    seconds after which (or once the projection exceeds ``HOPELESS_FACTOR`` × it) the process is
    stopped and the result says ``too_slow`` with the measured rate. Scoring progress is reported
    in tokens (``chunk_tokens`` per chunk), with the caller's ``progress`` called every poll so
    that a renderer can show the clock running while the count does not move. If the process
    dies or is stopped after every chunk was scored, the quality result is kept and ``speed``
    carries the error."""
    workdir.mkdir(parents=True, exist_ok=True)
    job = {**job, "dir": str(workdir)}
    (workdir / "job.json").write_text(json.dumps(job))
    log = workdir / "worker.log"
    env = {**os.environ, "QUANTKIT_DEBUG": "1", "PYTHONUNBUFFERED": "1"}
    w = _Watch()
    stopped: str | None = None
    too_slow = False
    with log.open("wb") as lf:
        proc = subprocess.Popen(
            _worker_command(job, workdir),
            stdout=lf,
            stderr=subprocess.STDOUT,
            env=env,
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
                new = w.read(workdir / "progress", now)
                if progress is not None:  # every step, or the latest again as a heartbeat
                    for stage, done, total in new or [(w.stage, w.done, w.total)]:
                        scale = chunk_tokens if stage == "score" else 1
                        progress(f"{label} {stage}", done * scale, total * scale)
                if rc is not None:
                    break
                if now - t0 >= timeout:
                    stopped = f"timed out after {timeout:g} s"
                elif budget is not None and w.stage != "speed":
                    proj = w.projected(now, t0)
                    if now - t0 >= budget or (proj is not None and proj > HOPELESS_FACTOR * budget):
                        stopped, too_slow = _too_slow(w, now, t0, budget, chunk_tokens), True
                elif budget is not None and now - t0 >= budget:
                    stopped = f"stopped at the {budget / 60:g}-minute budget"
                if stopped:
                    kill_group(proc)
                    rc = proc.returncode
        except BaseException:
            kill_group(proc)  # interrupted (Ctrl-C, SIGTERM): the worker is in its own session
            raise
    tail = log_tail(log)
    return _outcome(workdir, job, rc, stopped, too_slow, tail), tail


def _outcome(
    workdir: Path,
    job: dict[str, Any],
    rc: int | None,
    stopped: str | None,
    too_slow: bool,
    tail: list[str],
) -> dict[str, Any]:
    res_file, scored_file = workdir / "result.json", workdir / "scored.json"
    if res_file.is_file() and not stopped:
        return json.loads(res_file.read_text())
    if stopped:
        why = stopped
    else:
        code = f"signal {-rc}" if rc is not None and rc < 0 else f"exit code {rc}"
        last = last_error_line(tail)
        why = f"the engine process died ({code})" + (f": {last}" if last else "")
    if scored_file.is_file():  # every chunk was scored: only the speed run was lost
        res = json.loads(scored_file.read_text())
        pp, tg = int(job.get("pp", 0)), int(job.get("tg", 0))
        res["speed"] = {"pp": pp, "tg": tg, "pp_tps": None, "tg_tps": None, "error": why}
        return res
    if stopped and too_slow:
        return {"ok": False, "too_slow": True, "error": why}
    if stopped:
        return {"ok": False, "error": why}
    return {"ok": False, "error": why + " without a result"}


def write_json_atomic(path: Path, obj: Any) -> None:
    """``path`` whole or absent (a reader polling for it never sees half a file)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)
