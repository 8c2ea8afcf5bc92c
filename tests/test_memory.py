"""Memory: a validation worker reports its own peak (not its parent's), and the preflight
refuses a step that cannot fit before it starts, with the numbers."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

from quantkit.errors import InputError
from quantkit.memory import (
    LIMIT_ENV,
    Need,
    Room,
    Shape,
    check,
    imatrix_need,
    memory_available,
    parse_size,
    proc_status,
    reference_need,
)


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


# -- preflight -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(
        tmp_path_factory.mktemp("mem") / "m", "LlamaForCausalLM", dtype="bfloat16"
    )


def test_sizes_and_the_limit_variable(monkeypatch) -> None:
    assert parse_size("12G") == 12 * 2**30 and parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5g") == 3 * 2**29 and parse_size("4096") == 4096
    for bad in ("lots", "-1G", "0"):
        with pytest.raises(InputError):
            parse_size(bad)
    monkeypatch.delenv(LIMIT_ENV, raising=False)
    room = memory_available()
    assert room is not None and room.bytes > 0
    monkeypatch.setenv(LIMIT_ENV, "1M")
    assert memory_available() == Room(2**20, f"allowed by {LIMIT_ENV}")


def test_check_refuses_with_the_numbers() -> None:
    need = Need("a step", {"weights": 3 * 2**30, "buffers": 2**30}, "use the smaller option")
    check(need, Room(5 * 2**30, "available"))  # fits: nothing happens
    with pytest.raises(InputError) as e:
        check(need, Room(2**30, "available"))
    msg = str(e.value)
    assert "a step needs about 4.0 GiB" in msg and "weights 3.0 GiB" in msg
    assert "this machine has 1.0 GiB available" in msg and "use the smaller option" in msg


def test_estimates_follow_the_config(tiny: Path) -> None:
    from quantkit.checkpoint import Checkpoint

    with Checkpoint.open(tiny) as ck:
        s = Shape.of(ck)
    assert s.source_dtype == "BF16" and s.layer_params > 0 and s.expert_params == 0
    one, many = imatrix_need(s, ctx=64, chunks=1), imatrix_need(s, ctx=64, chunks=50)
    assert many.bytes > one.bytes  # hidden states of every chunk are carried
    same = reference_need(s, ctx=64, dtype=None)
    wider = reference_need(s, ctx=64, dtype="float32")
    # weights stay file-backed in bfloat16; float32 copies exist one module at a time
    assert s.other_params == 0 and 0 < s.tensor_params < s.n_params
    assert wider.bytes - same.bytes == 4 * s.tensor_params
    mixed = reference_need(dataclasses.replace(s, other_params=10), ctx=64, dtype="float32")
    assert mixed.bytes - same.bytes >= 4 * s.n_params  # a mixed checkpoint loads converted whole
    assert "--reference-dtype bfloat16" in mixed.fits and "--reference-dtype" not in wider.fits


def test_imatrix_refuses_up_front(tiny: Path, tmp_path: Path) -> None:
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT * 4)
    out = tmp_path / "im.gguf"
    r = run_cli("imatrix", str(tiny), "--calib", str(calib), "--ctx", "64", "-o", str(out),
                env={LIMIT_ENV: "64M"})  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert "imatrix needs about" in lines[0] and f"0.1 GiB allowed by {LIMIT_ENV}" in lines[0]
    assert "Traceback" not in r.stderr and "--chunks" in r.stderr
    assert not out.exists()


def test_validate_refuses_the_reference_up_front(tiny: Path, tmp_path: Path) -> None:
    from quantkit.convert import convert

    gguf = tmp_path / "tiny-F32.gguf"
    convert(tiny, ["gguf:F32"], gguf)
    data = tmp_path / "data.txt"
    data.write_text(TRAIN_TEXT * 4)
    r = run_cli("validate", str(gguf), "--reference", str(tiny), "--data", str(data),
                "--ctx", "64", "--chunks", "1", "--reference-dtype", "float32", "--no-cache",
                env={LIMIT_ENV: "300M"})  # fmt: skip
    assert r.returncode == 2, r.stderr
    assert "the validation reference needs about" in r.stderr
    assert f"allowed by {LIMIT_ENV}" in r.stderr and "lower --ctx" in r.stderr
    assert "Traceback" not in r.stderr


def test_llamacpp_counts_the_repacked_weights() -> None:
    from quantkit.memory import llamacpp_need

    need = llamacpp_need(5 * 2**30)
    assert need.bytes > 5 * 2**30
    with pytest.raises(InputError, match="repacked by the CPU backend"):
        check(need, Room(4 * 2**30, "available"))


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "Gemma3ForCausalLM"])
def test_reference_computes_in_another_dtype_without_converting_the_weights(
    arch: str, tmp_path: Path
) -> None:
    """--reference-dtype float32 on a BF16 checkpoint: the weights stay the files' BF16 views,
    each module runs in float32, and the log-probs are those of the whole model converted to
    float32 (the same arithmetic)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.validate.engines import TransformersEngine, log_softmax32

    model = make_tiny_model(tmp_path / "m", arch, dtype="bfloat16")
    chunk = [int(i) for i in (np.arange(48) * 7 % 200 + 3)]
    eng = TransformersEngine(model, n_ctx=64, threads=1, dtype="float32")
    eng.load()
    got = eng.score(chunk, 16).logprobs
    assert {p.dtype for p in eng.model.parameters()} == {torch.bfloat16}
    assert eng.describe()["dtype"] == "float32"
    whole = AutoModelForCausalLM.from_pretrained(
        model, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        logits = whole(torch.tensor([chunk])).logits[0, 16:47].float().numpy()
    want = log_softmax32(logits)
    assert got is not None and got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # and it is not the BF16 computation
    bf = TransformersEngine(model, n_ctx=64, threads=1)
    bf.load()
    assert np.abs(bf.score(chunk, 16).logprobs - want).max() > 1e-4
