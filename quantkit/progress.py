"""Progress of long steps on stderr, with rate and ETA.

Library code reports progress as ``progress(stage, done, total)`` calls (quantkit never prints
from library code); this is the one renderer the CLI hands them to. On a terminal each stage is a
tqdm bar (count, rate, elapsed, ETA). Elsewhere — a CI log, a release job piped to a file — a bar
would print nothing, so a plain line is written once a stage has run ``first_after`` seconds, then
at most every ``heartbeat`` seconds, and when such a stage ends: short steps stay quiet, and a step
that takes an hour is never an hour of silence.
Callers may repeat the same ``(stage, done, total)`` while waiting (the validation harness does,
every half second): that is the heartbeat of a step whose count does not move (an engine
loading, a first chunk still being scored).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TextIO

# progress(stage, done, total): what library code calls; the CLI draws bars from it.
Progress = Callable[[str, int, int], None]

# The unit of a stage's count, by a word of the stage, the last first ("Q4_K_M.gguf score" counts
# tokens, "quantize Q4_K_M" tensors, "gptq:calibrate layers" llm-compressor's sequential
# subgraphs, "sensitivity: calibrate" samples).
UNITS: dict[str, str] = {
    "score": "tok",
    "speed": "run",
    "load": "step",
    "imatrix": "chunk",
    "layers": "layer",
    "calibrate": "sample",
    "convert": "tensor",
    "quantize": "tensor",
    "plan": "tensor",
    "sensitivity": "pair",  # gguf:auto / gptq:auto: tensor (group) × candidate type pairs
    "probes": "kind",  # their per-kind measurements in the engine
    "selection": "candidate",  # gptq:auto: candidates exported, then scored in vLLM
    "hash": "MiB",
}
HEARTBEAT_S = 30.0
FIRST_AFTER_S = 10.0


def unit_for(stage: str) -> str:
    words = stage.replace(":", " ").split()
    return next((UNITS[w] for w in reversed(words) if w in UNITS), "step")


def clock(seconds: float) -> str:
    s = int(max(0.0, seconds))
    return (
        f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
    )


@dataclass
class _Stage:
    total: int
    t0: float = field(default_factory=time.monotonic)
    done: int = 0
    printed_at: float | None = None
    bar: Any = None


class ProgressPrinter:
    """``progress(stage, done, total)`` → bars on a terminal, throttled lines elsewhere."""

    def __init__(
        self,
        stream: TextIO | None = None,
        heartbeat: float = HEARTBEAT_S,
        tty: bool | None = None,
        first_after: float = FIRST_AFTER_S,
    ) -> None:
        self.stream = stream or sys.stderr
        self.heartbeat = heartbeat
        self.first_after = first_after
        self.tty = self.stream.isatty() if tty is None else tty
        self.stages: dict[str, _Stage] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        st = self.stages.get(stage)
        if st is None or done < st.done or total != st.total:
            if st is not None and st.bar is not None:
                st.bar.close()
            st = self.stages[stage] = _Stage(total=total)
        if self.tty:
            self._bar(stage, st, done)
        else:
            self._line(stage, st, done)
        st.done = done
        if done >= total:
            if st.bar is not None:
                st.bar.close()
            del self.stages[stage]

    def _bar(self, stage: str, st: _Stage, done: int) -> None:
        from tqdm import tqdm

        if st.bar is None:
            st.bar = tqdm(
                total=st.total,
                desc=stage,
                unit=unit_for(stage),
                unit_scale=True,
                leave=False,
                file=self.stream,
                dynamic_ncols=True,
            )
        if done > st.bar.n:
            st.bar.update(done - st.bar.n)  # update(), not n=: tqdm's rate comes from updates
        else:
            st.bar.refresh()  # the elapsed clock moves while the count does not

    def _line(self, stage: str, st: _Stage, done: int) -> None:
        now = time.monotonic()
        if st.printed_at is None:
            due = now - st.t0 >= self.first_after
        else:
            due = done >= st.total or now - st.printed_at >= self.heartbeat
        if not due:
            return
        st.printed_at = now
        self.stream.write(describe(stage, done, st.total, now - st.t0) + "\n")
        self.stream.flush()


def describe(stage: str, done: int, total: int, elapsed: float) -> str:
    """One line: ``stage: done/total unit, rate unit/s, elapsed, ETA``."""
    unit = unit_for(stage)
    parts = [f"{stage}: {done}/{total} {unit}"]
    if done >= total:
        parts.append(f"done in {clock(elapsed)}")
    elif done > 0 and elapsed > 0:
        rate = done / elapsed
        parts += [f"{rate:.3g} {unit}/s", f"elapsed {clock(elapsed)}"]
        parts.append(f"ETA {clock((total - done) / rate)}")
    else:
        parts.append(f"elapsed {clock(elapsed)}")
    return ", ".join(parts)
