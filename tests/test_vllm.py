"""The vLLM engine in `quantkit validate`: real vLLM (CPU build) in its own environment.

Tests that run vLLM skip when its environment is absent (`quantkit engines setup vllm`; CI runs
scripts/install.sh, which installs it). One `validate` call scores a GGUF in llama.cpp, the same
model's HF folder in vLLM and a broken folder in vLLM, so vLLM starts twice for the whole file.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from conftest import (
    TRAIN_TEXT,
    make_tiny_model,
    validate_report,
    vllm_env_or_skip,
)

from quantkit.validate.engines import engine_for, hf_file_type


def _write_config(d: Path, **cfg: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **cfg}))
    return d


def test_engine_for_sends_quantized_folders_to_vllm(tmp_path: Path) -> None:
    ct = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "weights": {"num_bits": 4, "type": "int", "group_size": 64},
                "input_activations": None,
                "targets": ["Linear"],
            }
        },
    }
    fp8 = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "group_0": {
                "weights": {"num_bits": 8, "type": "float", "strategy": "channel"},
                "input_activations": {"num_bits": 8, "type": "float", "dynamic": True},
            }
        },
    }
    cases = {
        "ct": ({"quantization_config": ct}, "vllm", "W4A16 g64"),
        "fp8": ({"quantization_config": fp8}, "vllm", "W8A8 FP8"),
        "gptq": (
            {"quantization_config": {"quant_method": "gptq", "bits": 4, "group_size": 128}},
            "vllm",
            "GPTQ 4-bit g128",
        ),
        "awq": (
            {"quantization_config": {"quant_method": "awq", "bits": 4, "group_size": 64}},
            "vllm",
            "AWQ 4-bit g64",
        ),
        "plain": ({"dtype": "bfloat16"}, "transformers", "BF16"),
    }
    i8 = {"num_bits": 8, "type": "int", "strategy": "channel"}
    fp4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    for name, w, a, label in (
        ("int8", i8, {"num_bits": 8, "type": "int", "dynamic": True}, "W8A8 INT8"),
        ("int8s", i8, {"num_bits": 8, "type": "int", "dynamic": False}, "W8A8 INT8 static"),
        ("nvfp4", fp4, {**fp4, "dynamic": "local"}, "W4A4 NVFP4"),
        ("nvfp4a16", fp4, None, "W4A16 NVFP4"),
        ("mxfp4", {**fp4, "group_size": 32}, {**fp4, "group_size": 32}, "W4A4 MXFP4"),
    ):
        group = {"weights": w, **({"input_activations": a} if a else {}), "targets": ["Linear"]}
        q = {"quant_method": "compressed-tensors", "config_groups": {"group_0": group}}
        cases[name] = ({"quantization_config": q}, "vllm", label)
    for name, (cfg, engine, label) in cases.items():
        d = _write_config(tmp_path / name, **cfg)
        assert engine_for(d) == engine, name
        assert hf_file_type(d) == label, name
    # a plain folder goes to vLLM when asked; a quantized one cannot be sent to transformers
    assert engine_for(tmp_path / "plain", "vllm") == "vllm"
    assert engine_for(tmp_path / "ct", "transformers") == "vllm"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(20))
    assert engine_for(gguf, "vllm") == "llama.cpp"


def test_missing_vllm_env_gives_the_setup_hint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the vLLM environment the vLLM worker cannot start: EngineError with the setup
    hint, which `validate` records as that artifact's error (the other artifacts go on)."""
    from quantkit.errors import EngineError
    from quantkit.validate.harness import run_worker

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "empty-cache"))
    q = _write_config(tmp_path / "q", quantization_config={"quant_method": "compressed-tensors"})
    job = {"role": "artifact", "engine": engine_for(q), "path": str(q), "first": 0, "threads": 1}
    with pytest.raises(EngineError, match=r"run `quantkit engines setup vllm`"):
        run_worker(job, tmp_path / "w", 10, None, "q")


def test_known_vllm_errors_get_a_hint() -> None:
    """The worker runs in the vLLM env, but its error wording is plain Python: load it here."""
    import importlib.util

    from quantkit.validate.engines import VllmEngine

    spec = importlib.util.spec_from_file_location("vllm_worker", VllmEngine.script)
    assert spec is not None and spec.loader is not None
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)  # stdlib + numpy at import time: vLLM is imported in run()
    # whether a format runs here is measured (validate/capabilities.py), not read from error
    # text: vLLM's own line comes back without a host guess
    e = AttributeError("'_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'")
    assert w.describe_error(e) == f"AttributeError: {e}"
    assert w.describe_error(ValueError("bad\n  shape")) == "ValueError: bad shape"
    moe = w.describe_error(ValueError("Unsupported FP8 MoE backend: NONE"))
    assert "fp8:experts=float" in moe  # an export-side fix the matrix does not give
    w4moe = NotImplementedError("No WNA16 MoE backend supports the deployment configuration.")
    assert w.describe_error(w4moe) == f"NotImplementedError: {w4moe}"  # no host guess added


@pytest.fixture(scope="module")
def vllm_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One validate call: tiny F32 GGUF (llama.cpp) + the same model's HF folder and a broken
    copy of it (both vLLM), against the transformers reference in float32."""
    vllm_env_or_skip()
    from quantkit.convert import convert

    d = tmp_path_factory.mktemp("vllm")
    model = make_tiny_model(d / "tiny", "LlamaForCausalLM")
    gguf = convert(model, ["F32"], d / "tiny-F32.gguf").artifacts[0].path
    broken = d / "tiny-broken"
    shutil.copytree(model, broken)
    st = broken / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])  # truncated in the tensor data
    text = d / "text.txt"
    text.write_text(TRAIN_TEXT)
    t0 = time.monotonic()
    r, rep = validate_report(
        [gguf, model, broken],
        model,
        text,
        d / "report.json",
        "--engine",
        "vllm",
        "--topk",
        "20",
        "--vllm-eager",  # torch.compile would add ~1 min per vLLM start on 2 busy cores
        "--md",
        str(d / "report.md"),
        env={"TMPDIR": str(d)},
    )
    return {"r": r, "rep": rep, "dir": d, "seconds": time.monotonic() - t0, "model": model}


def test_vllm_scores_next_to_gguf_in_one_report(vllm_run: dict) -> None:
    from quantkit.validate.report import check_schema

    r, rep = vllm_run["r"], vllm_run["rep"]
    assert r.returncode == 2, r.stdout + r.stderr  # the broken artifact fails the run
    check_schema(rep)
    gguf, hf, broken = rep["artifacts"]
    assert gguf["status"] == "ok" and gguf["engine"]["name"] == "llama.cpp"
    assert hf["status"] == "ok", hf
    e = hf["engine"]
    assert e["name"] == "vllm" and e["distribution"] == "top-k" and e["version"].startswith("vllm")
    assert e["dtype"] == "float32" and e["device"] == "cpu", e  # not vLLM's CPU default bf16
    assert hf["size"]["file_type"] == "F32" and hf["format"] == "hf"
    q = hf["quality"]
    assert q["kld_method"] == "approx-top-k"
    assert hf["tokenization"]["differ_share"] == 0.0 and hf["tokenization"]["bos_agrees"]
    # The same F32 weights on the same ids: vLLM's top-1 must match the reference everywhere and
    # its (approximate) KLD be at float32 noise, as llama.cpp's F32 GGUF is.
    assert q["top1_pct"] == 100.0, q
    assert q["kld_mean"] < 1e-5 and q["kld_max"] < 1e-3, q
    sp = hf["speed"]
    assert sp["load_seconds"] > 0 and sp["pp_tps"] > 0 and sp["tg_tps"] > 0
    assert sp["peak_rss_bytes"] > 100 * 2**20
    md = (vllm_run["dir"] / "report.md").read_text()
    assert "| tiny | F32 |" in md and "| ~" in md, "vLLM's KLD is marked approximate"
    assert "~ approximate KLD: the engine returns only its top-20 log-probs" in md
    assert "~ approximate KLD" in vllm_run["r"].stdout
    print(
        f"\nvLLM: load {sp['load_seconds']:.1f} s, pp {sp['pp_tps']:.0f} t/s, "
        f"tg {sp['tg_tps']:.1f} t/s; whole validate call {vllm_run['seconds']:.0f} s"
    )


def test_vllm_ppl_matches_transformers_reference(vllm_run: dict) -> None:
    """PPL from vLLM's prompt log-probs vs transformers (float32, eager) on the same ids.

    Both run the same float32 weights; they differ only in kernel summation order (vLLM's CPU
    attention and matmuls vs eager PyTorch): measured on this tiny model, target log-probs
    within 1.2e-5 and PPL within 5e-7 relative (5e-5 %). 5e-3 % leaves a factor 100 of margin
    and still fails for a real bug (an off-by-one position or vLLM's default bfloat16 for a
    float32 checkpoint move PPL by far more)."""
    hf = vllm_run["rep"]["artifacts"][1]
    assert hf["status"] == "ok", hf
    ref = vllm_run["rep"]["reference"]
    assert ref["engine"]["dtype"] == "float32"
    assert abs(hf["quality"]["ppl_increase_pct"]) < 5e-3, (hf["quality"], ref["ppl"])


def test_broken_artifact_reports_vllms_error_on_one_line(vllm_run: dict) -> None:
    broken = vllm_run["rep"]["artifacts"][2]
    assert broken["status"] == "failed"
    err = broken["error"]
    assert "\n" not in err and len(err) < 2000
    assert "safetensors" in err.lower() or "deserializ" in err.lower(), err
    assert broken["log_tail"], "the engine log's tail comes with the failure"
    assert "could not be scored: tiny-broken" in vllm_run["r"].stderr


def test_vllm_worker_killed_on_timeout(vllm_run: dict, tmp_path: Path) -> None:
    """A vLLM worker over its timeout fails its job, and no engine process is left behind."""
    import numpy as np

    from quantkit.validate.harness import run_worker

    np.save(tmp_path / "chunks.npy", np.zeros((1, 16), dtype=np.int32))
    job = {
        "role": "artifact",
        "engine": "vllm",
        "path": str(vllm_run["model"]),
        "chunks": str(tmp_path / "chunks.npy"),
        "first": 8,
        "threads": 1,
        "options": {"eager": True},
    }
    t0 = time.monotonic()
    res, tail = run_worker(job, tmp_path / "w", 3, None, "x")  # importing vLLM alone takes longer
    assert not res["ok"] and res["error"] == "timed out after 3 s"
    assert time.monotonic() - t0 < 30
    left = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if str(tmp_path / "w").encode() in cmd:
            left.append(cmd)
    assert left == [], left


def test_tensor_parallel_2_scores_like_one_rank(vllm_run: dict) -> None:
    """`--tensor-parallel-size 2`: vLLM's CPU backend runs two ranks (one process each, one core
    each: VLLM_CPU_OMP_THREADS_BIND=0|1) that split every attention head group and MLP, and
    all-reduce their partial sums. The same F32 weights on the same ids must score as one rank
    does, up to float summation order: measured on this tiny model, PPL within 2e-9 relative
    and target log-probs within 1.3e-5 of the reference (one rank: 1.2e-5)."""
    from quantkit.host import has_cuda, usable_cores

    if not has_cuda() and usable_cores() < 2:
        pytest.skip("two vLLM ranks on CPU need two cores; this process may use one")
    one = vllm_run["rep"]["artifacts"][1]
    assert one["status"] == "ok", one
    d, model = vllm_run["dir"], vllm_run["model"]
    r, rep = validate_report(
        [model], model, d / "text.txt", d / "tp2.json",
        "--engine", "vllm", "--topk", "20", "--vllm-eager", "--tensor-parallel-size", "2",
        env={"TMPDIR": str(d)},
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    two = rep["artifacts"][0]
    assert two["status"] == "ok", two
    layout = two["engine"]["parallel"]
    assert layout["tensor_parallel_size"] == 2 and layout["world_size"] == 2, layout
    assert layout["executor"] == "mp", layout
    # each rank is a process holding its half of the model (and torch, vLLM): both reported
    assert sorted(layout["ranks_peak_rss_bytes"])[-2] > 100 * 2**20, layout
    if not has_cuda():  # one core list per rank
        assert len(layout["threads_bind"].split("|")) == 2, layout
    assert one["engine"]["parallel"]["world_size"] == 1
    q1, q2 = one["quality"], two["quality"]
    assert abs(q2["ppl"] / q1["ppl"] - 1) < 1e-5, (q1, q2)
    assert q2["top1_pct"] == 100.0 and q2["kld_mean"] < 1e-5 and q2["kld_max"] < 1e-3, q2
    assert q2["max_abs_dlogprob"] < 1e-4, q2
