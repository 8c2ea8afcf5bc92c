"""`quantkit validate`: the harness, its report and gates, on a tiny model and the embedded default."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, fixture_path, make_tiny_model, run_cli


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quantkit.convert import convert

    d = tmp_path_factory.mktemp("validate-tiny")
    model = make_tiny_model(d / "tiny", "LlamaForCausalLM")
    f32 = convert(model, ["F32"], d / "tiny-F32.gguf").artifacts[0].path
    broken = d / "broken-Q8_0.gguf"
    broken.write_bytes(f32.read_bytes()[: f32.stat().st_size // 3])  # truncated in the tensor data
    text = d / "text.txt"
    text.write_text(TRAIN_TEXT)
    return {"model": model, "f32": f32, "broken": broken, "text": text, "dir": d}


def _validate_cli(t: dict[str, Path], *extra: str, env: dict[str, str]):
    return run_cli(
        "validate",
        *extra,
        "--reference",
        str(t["model"]),
        "--data",
        str(t["text"]),
        "--ctx",
        "128",
        "--chunks",
        "6",
        "--threads",
        "2",
        "--pp",
        "32",
        "--tg",
        "8",
        "--kv-f32",
        env=env,
    )


def test_f32_matches_hf_and_corrupt_artifact_fails_alone(tiny: dict[str, Path]) -> None:
    from quantkit.validate.report import check_schema

    d = tiny["dir"]
    env = {"QUANTKIT_CACHE": str(d / "cache")}
    out = d / "report.json"
    r = _validate_cli(
        tiny,
        str(tiny["broken"]),
        str(tiny["f32"]),
        str(tiny["model"]),  # an HF folder is scored in transformers
        "--json",
        str(out),
        "--md",
        str(d / "report.md"),
        "--plot",
        str(d / "report.png"),
        env=env,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert "could not be scored: broken-Q8_0.gguf" in r.stderr
    rep = json.loads(out.read_text())
    check_schema(rep)
    broken, f32, hf = rep["artifacts"]
    assert hf["status"] == "ok" and hf["engine"]["name"] == "transformers", hf
    assert hf["quality"]["kld_mean"] < 1e-7 and hf["quality"]["top1_pct"] == 100.0
    assert f32["engine"]["name"] == "llama.cpp" and f32["engine"]["kv_cache"] == "F32"
    assert f32["engine"]["flash_attn"] is True
    assert broken["status"] == "failed" and broken["error"]
    assert broken["log_tail"], "a failed artifact carries the tail of its engine's log"
    assert f32["status"] == "ok", f32
    q = f32["quality"]
    assert q["kld_method"] == "exact"
    assert q["kld_mean"] < 1e-4, q
    assert q["top1_pct"] == 100.0, q
    assert abs(q["ppl_increase_pct"]) < 0.1, q
    assert f32["tokenization"]["differ_share"] == 0.0
    assert f32["size"]["file_type"] == "F32" and f32["size"]["bits_per_weight"] == pytest.approx(32)
    sp = f32["speed"]
    assert sp["pp_tps"] > 0 and sp["tg_tps"] > 0 and sp["peak_rss_bytes"] > 0
    assert rep["reference"]["cache"]["dtype"] == "float32"
    assert rep["data"]["chunks"] == 6 and rep["data"]["scored_tokens"] == 6 * 63
    assert (d / "report.png").read_bytes()[:4] == b"\x89PNG"
    md = (d / "report.md").read_text()
    assert "broken-Q8_0.gguf failed" in md and "| tiny-F32.gguf | F32 |" in md


def test_gate_tighter_than_measured_exits_1(tiny: dict[str, Path]) -> None:
    from quantkit.validate.report import check_schema

    d = tiny["dir"]
    env = {"QUANTKIT_CACHE": str(d / "cache")}
    out = d / "gated.json"
    r = _validate_cli(
        tiny,
        str(tiny["f32"]),
        "--max-kld",
        "1e-12",
        "--min-top1",
        "99",
        "--json",
        str(out),
        env=env,
    )
    assert r.returncode == 1, r.stdout + r.stderr
    assert "max-kld" in r.stderr and "min-top1" not in r.stderr
    assert "GATE FAILED" in r.stdout
    rep = json.loads(out.read_text())
    check_schema(rep)
    assert [g["gate"] for g in rep["failed_gates"]] == ["max-kld"]
    assert rep["reference"]["cache"]["hit"], "the reference log-probs come from the cache"
    r = _validate_cli(tiny, str(tiny["f32"]), "--max-kld", "1e-3", "--min-top1", "99", env=env)
    assert r.returncode == 0, r.stdout + r.stderr


def test_bad_input_exits_2(tiny: dict[str, Path]) -> None:
    r = run_cli(
        "validate", str(tiny["f32"]), "--reference", str(tiny["dir"]), "--data", str(tiny["text"])
    )
    assert r.returncode == 2 and "config.json" in r.stderr
    short = tiny["dir"] / "short.txt"
    short.write_text("Once upon a time there was a robot.")
    r = run_cli(
        "validate", str(tiny["f32"]), "--reference", str(tiny["model"]), "--data", str(short)
    )
    assert r.returncode == 2 and "fewer than one chunk" in r.stderr


def test_parallel_layout_beyond_the_host_exits_2(tiny: dict[str, Path]) -> None:
    """More vLLM ranks than this CPU host has cores: one line, exit 2, before anything runs."""
    import os

    cores = len(os.sched_getaffinity(0))
    args = ("validate", str(tiny["f32"]), "--reference", str(tiny["model"]))
    args += ("--data", str(tiny["text"]))
    r = run_cli(*args, "--tensor-parallel-size", str(cores + 1), env={"QUANTKIT_CUDA": "0"})
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"needs {cores + 1} vLLM ranks, one per core, and this host has {cores} CPU" in err
    assert f"at most {cores} ranks" in err, err
    r = run_cli(*args, "--pipeline-parallel-size", "0")
    assert r.returncode == 2 and "--pipeline-parallel-size" in r.stderr, r.stderr


def test_vllm_threads_bind_one_core_list_per_rank() -> None:
    """The worker runs in the vLLM env; its binding helper is plain Python: load it here."""
    import importlib.util

    from quantkit.validate.engines import VllmEngine

    spec = importlib.util.spec_from_file_location("vllm_worker", VllmEngine.script)
    assert spec is not None and spec.loader is not None
    w = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(w)
    assert w.threads_bind([0, 1], 2, 1) == "0,1"
    assert w.threads_bind([0, 1], 2, 2) == "0|1"
    assert w.threads_bind([0, 1], 1, 2) == "0|1", "every rank gets a core of its own"
    assert w.threads_bind([2, 3, 5, 7], 4, 2) == "2,3|5,7"
    assert w.threads_bind([0, 1, 2, 3, 4], 5, 2) == "0,1|2,3"
    assert w.threads_bind(list(range(8)), 8, 4) == "0,1|2,3|4,5|6,7"
    with pytest.raises(ValueError, match="3 vLLM ranks need 3 cores"):
        w.threads_bind([0, 1], 2, 3)


def test_ctx_pp_tg_capped_to_the_model_context(tiny: dict[str, Path]) -> None:
    """Positions past max_position_embeddings (256 here) are not asked of any engine: ctx, pp
    and tg are capped, and the report says so."""
    out = tiny["dir"] / "capped.json"
    r = run_cli(
        "validate", str(tiny["f32"]), "--reference", str(tiny["model"]), "--data",
        str(tiny["text"]), "--ctx", "100000", "--pp", "100000", "--tg", "300", "--chunks", "1",
        "--threads", "2", "--no-cache", "--json", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    from quantkit.validate.report import check_schema

    rep = json.loads(out.read_text())
    check_schema(rep)
    assert rep["data"]["ctx"] == 256
    sp = rep["artifacts"][0]["speed"]
    assert (sp["pp"], sp["tg"]) == (256, 256) and sp["pp_tps"] and sp["tg_tps"]
    assert len(rep["notes"]) == 3 and all("256 positions" in n for n in rep["notes"])
    assert "--pp 100000 is beyond the model's context" in r.stdout


def test_worker_timeout_fails_the_job(tmp_path: Path, tiny: dict[str, Path]) -> None:
    from quantkit.validate.harness import run_worker

    np.save(tmp_path / "chunks.npy", np.zeros((1, 16), dtype=np.int32))
    job = {
        "role": "artifact",
        "engine": "llama.cpp",
        "path": str(tiny["f32"]),
        "chunks": str(tmp_path / "chunks.npy"),
        "first": 8,
        "threads": 1,
        "ref_logprobs": str(tmp_path / "missing.npy"),
    }
    res, tail = run_worker(job, tmp_path / "w", 0.01, None, "x")
    assert not res["ok"] and "timed out" in res["error"]


def test_topk_kld_is_a_lower_bound_and_exact_with_full_k() -> None:
    from quantkit.validate.engines import log_softmax32
    from quantkit.validate.metrics import position_stats, position_stats_topk

    rng = np.random.default_rng(0)
    ref = log_softmax32(rng.normal(size=(20, 50)) * 3)
    q = log_softmax32(np.asarray(ref) + rng.normal(size=(20, 50)))
    targets = rng.integers(0, 50, size=20)
    exact = position_stats(q, targets, ref)
    for k, tight in ((50, True), (5, False)):
        ids = np.argsort(-q, axis=1)[:, :k]
        approx = position_stats_topk(
            ids, np.take_along_axis(q, ids, 1), q[np.arange(20), targets], targets, ref
        )
        assert np.allclose(approx[0], exact[0], atol=1e-5)
        assert np.array_equal(approx[2], exact[2])
        if tight:
            assert np.allclose(approx[1], exact[1], atol=1e-5)
        else:
            assert np.all(approx[1] <= exact[1] + 1e-6)


def test_token_mismatch_share() -> None:
    from quantkit.validate.worker import token_mismatch_share

    assert token_mismatch_share([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert token_mismatch_share([1, 2, 3, 4], [1, 2, 9, 4]) == pytest.approx(0.25)


def test_demo_kld_ladder(demo_model_dir: Path, tmp_path: Path) -> None:
    """On the embedded default, KLD rises Q8_0 < Q4_K_M < Q2_K (2 chunks of 256 from wikitext)."""
    from quantkit.convert import convert
    from quantkit.validate.harness import Settings, validate
    from quantkit.validate.report import check_schema

    wiki = fixture_path("wikitext-2-raw", "wiki.test.raw").read_text()[:20_000]
    text = tmp_path / "wiki.txt"
    text.write_text(wiki)
    arts = convert(demo_model_dir, ["Q8_0", "Q4_K_M", "Q2_K"], tmp_path).artifacts
    rep = validate(
        [a.path for a in arts],
        demo_model_dir,
        text,
        # F16 weights computed in float32: same weights, ~4x faster than float16 matmuls on CPU
        Settings(ctx=256, chunks=2, threads=2, pp=0, tg=0, reference_dtype="float32"),
    )
    check_schema(rep)
    kld = {a["size"]["file_type"]: a["quality"]["kld_mean"] for a in rep["artifacts"]}
    assert kld["Q8_0"] < kld["Q4_K_M"] < kld["Q2_K"], kld
    for a in rep["artifacts"]:
        assert a["tokenization"]["differ_share"] == 0.0, a["tokenization"]


def test_gates_options_and_type_defaults() -> None:
    from quantkit.validate.harness import Gates

    art = {
        "size": {"file_type": "Q4_K_M"},
        "quality": {"kld_mean": 0.07, "ppl_increase_pct": 3.0, "top1_pct": 90.0},
    }
    assert Gates().check(art) == []
    got = {g["gate"]: g for g in Gates(min_top1_pct=95, per_type_defaults=True).check(art)}
    assert not got["max-kld"]["passed"] and got["max-kld"]["source"] == "type default"
    assert got["max-ppl-increase"]["passed"]
    assert not got["min-top1"]["passed"] and got["min-top1"]["source"] == "option"


def test_float16_reference_cache_keeps_kld_exactish(
    tiny: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large references are stored in float16; renormalized, they still give KLD ≈ 0 for F32."""
    from quantkit.validate import worker
    from quantkit.validate.harness import tokenize_reference
    from quantkit.validate.metrics import make_chunks

    monkeypatch.setattr(worker, "REF_F32_LIMIT", 0)
    ids, bos = tokenize_reference(tiny["model"], tiny["text"].read_text())
    np.save(tmp_path / "c.npy", np.asarray(make_chunks(ids, 128, 3, bos), dtype=np.int32))
    base = {"chunks": str(tmp_path / "c.npy"), "first": 64, "threads": 2, "dir": str(tmp_path)}
    ref = worker.run(
        {**base, "role": "reference", "engine": "transformers", "path": str(tiny["model"]),
         "ref_out": str(tmp_path)}
    )  # fmt: skip
    assert ref["ref_dtype"] == "float16"
    res = worker.run(
        {**base, "role": "artifact", "engine": "llama.cpp", "path": str(tiny["f32"]),
         "ref_logprobs": str(tmp_path / "logprobs.npy"), "options": {"kv_f32": True}}
    )  # fmt: skip
    assert res["quality"]["kld_mean"] < 1e-4, res["quality"]
    assert res["quality"]["top1_pct"] == 100.0
    assert abs(res["quality"]["ppl"] / ref["quality"]["ppl"] - 1) < 1e-3
