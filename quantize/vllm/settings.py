"""How one vLLM export runs: ignore list, layouts, calibration, threads, limits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from quantkit.quantize.vllm.targets import (
    DEFAULT_IGNORE,
)
from quantkit.targets import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN


@dataclass
class VllmSettings:
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    layouts: tuple[str, ...] = ("compressed-tensors",)
    calib: Path | None = None
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    threads: int | None = None
    timeout: float = 6 * 3600
    check_memory: bool = True
