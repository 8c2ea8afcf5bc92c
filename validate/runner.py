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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.progress import Progress, clock
from quantkit.worker_jobs import JOB_FILE, LOG_FILE, RESULT_FILE, ProgressLines, run_job

LOG_TAIL_LINES = 25
# A budget is also given up early when, after at least one scored chunk, the projected time is
# this many times the budget: the rate of later chunks does not recover such a gap (each chunk is
# the same amount of work), and waiting the whole budget out would only burn it.
HOPELESS_FACTOR = 2.0

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
class _Watch(ProgressLines):
    """What the progress file says of a running engine worker, its scored chunks included."""

    chunks_done: int = 0
    chunks: int = 0

    @property
    def score_t0(self) -> float | None:
        """Monotonic time the first chunk started."""
        return self.first_seen.get("score")

    def line(self, stage: str, done: int, total: int, now: float) -> None:
        if stage == "score":
            self.chunks_done, self.chunks = done, total

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
    from quantkit.validate.engines import ENGINES

    return ENGINES[job["engine"]].worker_command(workdir / JOB_FILE)


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
    job = {**job, "dir": str(workdir)}
    env = {**os.environ, "QUANTKIT_DEBUG": "1", "PYTHONUNBUFFERED": "1"}
    w = _Watch()
    too_slow = False

    def over_budget(now: float, t0: float) -> str | None:
        nonlocal too_slow
        assert budget is not None
        if w.stage == "speed":  # every chunk scored: only the budget itself stops the speed run
            return f"stopped at the {budget / 60:g}-minute budget" if now - t0 >= budget else None
        proj = w.projected(now, t0)
        if now - t0 >= budget or (proj is not None and proj > HOPELESS_FACTOR * budget):
            too_slow = True
            return _too_slow(w, now, t0, budget, chunk_tokens)
        return None

    fin = run_job(
        _worker_command(job, workdir),
        job,
        workdir,
        timeout=timeout,
        env=env,
        progress=progress,
        label=label,
        units={"score": chunk_tokens},
        watch=w,
        stop=None if budget is None else over_budget,
    )
    tail = log_tail(workdir / LOG_FILE)
    return _outcome(workdir, job, fin.rc, fin.stopped, too_slow, tail), tail


def _outcome(
    workdir: Path,
    job: dict[str, Any],
    rc: int | None,
    stopped: str | None,
    too_slow: bool,
    tail: list[str],
) -> dict[str, Any]:
    res_file, scored_file = workdir / RESULT_FILE, workdir / "scored.json"
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
