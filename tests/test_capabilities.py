"""The capability matrix (validate/capabilities.py, `quantkit engines check`): row ids from
artifacts, the cached per-host verdicts, and validate's use of them.

Expectations follow what this host measures, never a guess from CPU flags: the end-to-end tests
read the row a real artifact maps to and check that validate did what it says (scored, scored
with the row's fix and a note, or "unsupported" without starting the engine).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from conftest import (
    TRAIN_TEXT,
    assert_scored_as_measured,
    host_verdict,
    llmc_python_or_skip,
    make_tiny_model,
    run_cli,
    validate_report,
    vllm_env_or_skip,
)

from quantkit.validate import capabilities as cap


def _folder(d: Path, **cfg: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], **cfg}))
    return d


def _ct(weights: dict, acts: dict | None = None, **q: object) -> dict:
    groups = {"group_0": {"weights": weights, "input_activations": acts, "targets": ["Linear"]}}
    return {"quant_method": "compressed-tensors", "config_groups": groups, **q}


def test_format_of_hf_folders(tmp_path: Path) -> None:
    w4 = {"num_bits": 4, "type": "int", "group_size": 64, "symmetric": True}
    fp8w = {"num_bits": 8, "type": "float", "strategy": "channel"}
    dyn = {"num_bits": 8, "type": "float", "dynamic": True}
    cases = {
        "hf:bf16": {"dtype": "bfloat16"},
        "hf:f32": {"torch_dtype": "float32"},
        "w4a16-g64:f32": {"dtype": "float32", "quantization_config": _ct(w4)},
        "w4a16-g128-asym:f16": {
            "dtype": "float16",
            "quantization_config": _ct({**w4, "group_size": 128, "symmetric": False}),
        },
        "w8a16-ch:bf16": {
            "dtype": "bfloat16",
            "quantization_config": _ct({**w4, "num_bits": 8, "group_size": None}),
        },
        "fp8-dynamic:bf16": {"dtype": "bfloat16", "quantization_config": _ct(fp8w, dyn)},
        "fp8-static:bf16": {
            "dtype": "bfloat16",
            "quantization_config": _ct(fp8w, {**dyn, "dynamic": False}),
        },
        "fp8-block:bf16": {
            "dtype": "bfloat16",
            "quantization_config": _ct({**fp8w, "strategy": "block"}, dyn),
        },
        "moe/fp8-dynamic+float-experts:f32": {
            "dtype": "float32",
            "num_experts": 4,
            "quantization_config": _ct(
                fp8w, dyn, ignore=["lm_head", "re:.*\\.experts\\.\\d+\\..*"]
            ),
        },
        "moe/w4a16-g64:f32": {
            "dtype": "float32",
            "num_local_experts": 8,
            "quantization_config": _ct(w4),
        },
        "gptq-w4g64:f16": {
            "dtype": "float16",
            "quantization_config": {
                "quant_method": "gptq",
                "bits": 4,
                "group_size": 64,
                "sym": True,
            },
        },  # fmt: skip
        "awq-w4g128-asym:f16": {
            "dtype": "float16",
            "quantization_config": {
                "quant_method": "awq",
                "bits": 4,
                "group_size": 128,
                "zero_point": True,
            },
        },  # fmt: skip
    }
    for i, (row, cfg) in enumerate(cases.items()):
        d = _folder(tmp_path / f"m{i}", **cfg)
        assert cap.format_of(d) == row, (row, cfg)
        assert cap.parse_row(row).id == row  # every id format_of gives is a row it can measure
    # INT8 W8A8 and FP4 (compressed-tensors' W8A8, NVFP4[A16], MXFP4 presets)
    i8w = {"num_bits": 8, "type": "int", "strategy": "channel", "symmetric": True}
    i8a = {"num_bits": 8, "type": "int", "strategy": "token", "dynamic": True}
    fp4 = {"num_bits": 4, "type": "float", "strategy": "tensor_group", "group_size": 16}
    mx = {"num_bits": 4, "type": "float", "strategy": "group", "group_size": 32}
    new = {
        "w8a8-int8:bf16": _ct(i8w, i8a),
        "w8a8-int8-static:bf16": _ct(i8w, {**i8a, "strategy": "tensor", "dynamic": False}),
        "nvfp4:bf16": _ct(fp4, {**fp4, "dynamic": "local"}),
        "nvfp4-a16:bf16": _ct(fp4),
        "mxfp4:bf16": _ct(mx, {**mx, "dynamic": True}),
    }
    for i, (row, q) in enumerate(new.items()):
        d = _folder(tmp_path / f"n{i}", dtype="bfloat16", quantization_config=q)
        assert cap.format_of(d) == row, row
        assert cap.parse_row(row).id == row
    # formats the matrix has no row for
    assert cap.format_of(_folder(tmp_path / "nodtype")) is None
    w8a8fp = _ct({**w4, "num_bits": 8}, {"num_bits": 8, "type": "float", "dynamic": True})
    assert (
        cap.format_of(_folder(tmp_path / "w8a8", dtype="float16", quantization_config=w8a8fp))
        is None
    )
    lora = tmp_path / "lora"
    lora.mkdir()
    (lora / "adapter_config.json").write_text("{}")
    assert cap.format_of(lora) == "vllm-lora"


def test_format_of_gguf(tmp_path: Path) -> None:
    import gguf
    import numpy as np

    for name, ftype, kind in (
        ("q4.gguf", gguf.LlamaFileType.MOSTLY_Q4_K_M, "model"),
        ("lora.gguf", gguf.LlamaFileType.ALL_F32, "adapter"),
    ):
        w = gguf.GGUFWriter(str(tmp_path / name), "llama")
        w.add_type(kind)
        w.add_file_type(int(ftype))
        w.add_tensor("t", np.zeros(8, np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    assert cap.format_of(tmp_path / "q4.gguf") == "gguf:Q4_K_M"
    assert cap.format_of(tmp_path / "lora.gguf") == "gguf-lora"
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf")
    assert cap.format_of(tmp_path / "junk.gguf") is None


def test_rows_parse_and_unknown_rows_are_refused() -> None:
    for row in cap.DEFAULT_ROWS:
        r = cap.parse_row(row)
        assert r.engine == cap.engine_of(row) and r.title
    from quantkit.errors import InputError

    with pytest.raises(InputError, match="unknown capability row 'w3a16-g64:f32'"):
        cap.parse_row("w3a16-g64:f32")
    r = run_cli("engines", "check", "--only", "gguf:Q9_X")
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "unknown capability row 'gguf:Q9_X'" in r.stderr and "gguf:Q4_K_M" in r.stderr


def test_parallel_layout_rows() -> None:
    """tpN[-ppM]/ROW: a vLLM row measured in a parallel layout; the prefix is canonical."""
    from quantkit.errors import InputError

    r = cap.parse_row("tp2/hf:bf16")
    assert (r.engine, r.tp, r.pp, r.dtype) == ("vllm", 2, 1, "bfloat16")
    assert r.spec == cap.parse_row("hf:bf16").spec and "tensor-parallel 2" in r.title
    r = cap.parse_row("tp2-pp2/w4a16-g64:bf16")
    assert (r.tp, r.pp) == (2, 2) and "pipeline 2" in r.title
    assert cap.layout_prefix(1, 1) == "" and cap.layout_prefix(2, 1) == "tp2/"
    assert cap.layout_prefix(1, 2) == "tp1-pp2/" and cap.parse_row("tp1-pp2/hf:f32").pp == 2
    for bad in ("tp2/gguf:Q4_K_M", "tp1/hf:bf16", "tp2-pp1/hf:bf16", "tp0/hf:bf16"):
        with pytest.raises(InputError, match="unknown capability row"):
            cap.parse_row(bad)


def test_a_parallel_run_asks_its_layouts_row(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """validate with --tensor-parallel-size 2 consults tp2/<format>, not the one-rank row; a
    layout this host measured not to run is unsupported without starting vLLM."""
    from quantkit.validate.harness import Settings, validate

    reason = "RuntimeError: world size 2 needs a second rank"
    _fake_row(monkeypatch, "tp2/hf:f32", reason=reason)
    jobs = _artifact_jobs(monkeypatch)
    monkeypatch.setattr("quantkit.validate.engines.VllmEngine.check_parallel", lambda tp, pp: None)
    s = Settings(ctx=64, chunks=1, threads=1, pp=0, tg=0, cache=False, hf_engine="vllm",
                 tensor_parallel_size=2)  # fmt: skip
    rep = validate([tiny["model"]], tiny["model"], tiny["text"], s)
    (a,) = rep["artifacts"]
    assert jobs == [] and a["status"] == "unsupported", a
    assert a["error"].startswith(reason) and "row tp2/hf:f32" in a["error"], a["error"]


def test_engines_check_measures_once_then_reads_the_cache(tmp_path: Path) -> None:
    """A llama.cpp row measured in a fresh cache, then read back without measuring; a vLLM row
    where this cache has no vLLM environment is "not measured", with the setup hint."""
    env = {"QUANTKIT_CACHE": str(tmp_path / "cache")}
    args = ("engines", "check", "--only", "gguf:Q8_0", "--only", "hf:f32")
    r = run_cli(*args, "--json", env=env)
    assert r.returncode == 0, r.stderr
    first = json.loads(r.stdout)
    q8, hf = first["rows"]
    assert first["measured_rows"] == 1 and first["cached_rows"] == 0
    # the project's llama.cpp build is made to run quantized GGUFs on every CPU it builds for
    assert q8["row"] == "gguf:Q8_0" and q8["engine"] == "llama.cpp" and q8["runs"] is True, q8
    assert q8["reason"] is None and q8["fix"] == {} and q8["tps"] > 0, q8
    assert hf["runs"] is None and "quantkit engines setup vllm" in hf["reason"], hf
    assert first["engines"]["llama.cpp"]["key"] and first["engines"]["vllm"]["key"] is None
    files = list((tmp_path / "cache" / "capabilities").glob("llamacpp-*.json"))
    assert [f.stem for f in files] == [f"llamacpp-{first['engines']['llama.cpp']['key']}"]
    t0 = time.monotonic()
    r = run_cli(*args, env=env)
    assert r.returncode == 0, r.stderr
    assert time.monotonic() - t0 < 30
    assert "1 row(s) measured" not in r.stdout and "0 row(s) measured, 1 from the cache" in r.stdout
    line = next(ln for ln in r.stdout.splitlines() if "gguf:Q8_0" in ln)
    assert "runs" in line, r.stdout
    assert "not measured" in next(ln for ln in r.stdout.splitlines() if "hf:f32" in ln)
    r = run_cli("engines", "check", "--only", "gguf:Q8_0", "--refresh", "--json", env=env)
    again = json.loads(r.stdout)
    assert again["measured_rows"] == 1 and again["rows"][0]["measured"] >= q8["measured"]


# -- validate consults the matrix ----------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from quantkit.convert import convert

    d = tmp_path_factory.mktemp("capabilities")
    model = make_tiny_model(d / "tiny", "LlamaForCausalLM")
    q8 = convert(model, ["Q8_0"], d / "tiny-Q8_0.gguf").artifacts[0].path
    text = d / "text.txt"
    text.write_text(TRAIN_TEXT)
    return {"model": model, "q8": q8, "text": text, "dir": d}


def _fake_row(monkeypatch: pytest.MonkeyPatch, row: str, **v: object) -> None:
    fields = {"runs": False, "reason": None, "fix": {}, "note": None, "tps": None, **v}
    verdict = cap.Verdict(row=row, measured="2026-01-01T00:00:00Z", **fields)  # type: ignore[arg-type]
    real = cap.load
    monkeypatch.setattr(cap, "load", lambda engine, key=None: {**real(engine, key), row: verdict})


def _artifact_jobs(monkeypatch: pytest.MonkeyPatch) -> list[dict]:
    """Record the artifact jobs validate hands to a worker (the reference is scored for real)."""
    from quantkit.validate import harness

    jobs: list[dict] = []
    real = harness.run_worker

    def spy(job, workdir, timeout, progress, label, **kw):
        if job["role"] == "artifact":
            jobs.append(job)
        return real(job, workdir, timeout, progress, label, **kw)

    monkeypatch.setattr(harness, "run_worker", spy)
    return jobs


def test_a_row_that_cannot_run_is_unsupported_without_an_engine(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantkit.validate.harness import Settings, validate
    from quantkit.validate.report import check_schema, terminal_table

    reason = "RuntimeError: no kernel for this type here"
    _fake_row(monkeypatch, "gguf:Q8_0", reason=reason)
    jobs = _artifact_jobs(monkeypatch)
    s = Settings(ctx=64, chunks=1, threads=1, pp=0, tg=0, cache=False)
    rep = validate([tiny["q8"]], tiny["model"], tiny["text"], s)
    check_schema(rep)
    (a,) = rep["artifacts"]
    assert jobs == [], "no engine was started for the artifact"
    assert a["status"] == "unsupported" and a["log_tail"] == [] and "engine" not in a, a
    assert a["error"].startswith(reason) and "row gguf:Q8_0" in a["error"], a["error"]
    assert "\n" not in a["error"] and a["format"] == "gguf"
    assert rep["unsupported_artifacts"] == [a["name"]] and rep["failed_artifacts"] == []
    assert rep["passed"] is True
    assert f"not scorable on this host: {reason}" in terminal_table(rep)


def test_a_rows_fix_goes_into_the_job_with_a_note(
    tiny: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from quantkit.validate.harness import Settings, validate

    note = "runs with dtype=bfloat16 (16-bit activations); in its own float32 it fails: X"
    _fake_row(monkeypatch, "gguf:Q8_0", reason="X", fix={"dtype": "bfloat16"}, note=note)
    jobs = _artifact_jobs(monkeypatch)
    s = Settings(ctx=64, chunks=1, threads=1, pp=0, tg=0, cache=False)
    rep = validate([tiny["q8"]], tiny["model"], tiny["text"], s)
    (a,) = rep["artifacts"]
    assert [j["options"].get("dtype") for j in jobs] == ["bfloat16"]
    note = next(n for n in a["notes"] if n.startswith("scored with"))
    assert note.startswith("scored with dtype=bfloat16: ") and "gguf:Q8_0" in note, a
    assert note.endswith("fails with its default options: X"), a


# -- real rows, end to end -----------------------------------------------------------------------


def test_row_artifacts_are_their_own_format() -> None:
    """Every default row's tiny artifact, made by quantkit's own exports, maps back to the row:
    format_of reads real exports (legacy layouts, FP8 experts kept in float, MoE) right."""
    llmc_python_or_skip()
    from quantkit.validate.capability_artifacts import ensure

    rows = [cap.parse_row(r) for r in cap.DEFAULT_ROWS]
    paths = ensure(list(dict.fromkeys(r.spec for r in rows)))
    for r in rows:
        # a parallel layout's row (tp2/hf:bf16) is measured on its format's artifact
        assert cap.layout_prefix(r.tp, r.pp) + str(cap.format_of(paths[r.spec])) == r.id, r.id


def test_float32_w4a16_scored_as_the_host_measured(tmp_path: Path) -> None:
    """A float32 model's W4A16 export through `quantkit validate`: scored where the row runs,
    with 16-bit activations and a note where only its dtype fix runs, else "unsupported" with
    the measured reason and no vLLM start."""
    vllm_env_or_skip()
    llmc_python_or_skip()
    from quantkit.validate.capability_artifacts import ensure

    row = cap.parse_row("w4a16-g64:f32")
    paths = ensure([row.spec, cap.Spec("base", "llama", "f32")])
    w4, base = paths[row.spec], paths[cap.Spec("base", "llama", "f32")]
    v = host_verdict(w4)
    text = tmp_path / "text.txt"
    text.write_text(TRAIN_TEXT)
    r, rep = validate_report([w4], base, text, tmp_path / "r.json", "--vllm-eager")
    assert rep, r.stdout + r.stderr
    (a,) = rep["artifacts"]
    assert_scored_as_measured(a, w4)
    if v.fix:
        assert a["engine"]["dtype"] == v.fix["dtype"] and "note: " in r.stdout, r.stdout
    print(f"\nw4a16-g64:f32 on this host: {v}\n{r.stdout}")
