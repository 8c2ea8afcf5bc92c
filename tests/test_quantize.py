"""GGUF quantization through llama.cpp's own quantizer: every type, options, dry run, audit."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

from quantkit.quantize.gguf.types import GGUF_TYPES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    # every row length (256, 512) is a multiple of 256, so K- and IQ-quants apply without fallback
    return make_tiny_model(tmp_path_factory.mktemp("q") / "tiny", "LlamaForCausalLM")


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("calib") / "calib.txt"
    p.write_text(TRAIN_TEXT * 3)
    return p


@pytest.fixture(scope="module")
def all_types(tiny: Path, calib: Path, tmp_path_factory):
    """Every type in one call: one base conversion, one importance matrix."""
    from quantkit.convert import QuantSettings, convert

    out = tmp_path_factory.mktemp("all")
    return convert(
        tiny,
        [f"gguf:{t}" for t in GGUF_TYPES],
        out,
        quant=QuantSettings(calib=calib, calib_ctx=64),
    )


def test_every_type_loads_and_generates(all_types) -> None:
    from quantkit.validate.llamacpp import LlamaCppModel

    assert [a.type for a in all_types.artifacts] == list(GGUF_TYPES)
    for art in all_types.artifacts:
        assert art.audit is not None
        assert art.audit.fallbacks == [], f"{art.type}: {art.audit.fallbacks[:2]}"
        t = GGUF_TYPES[art.type]
        main = "Q8_0" if t.experts_only else t.main  # MXFP4_MOE on a dense model: Q8_0 file
        assert main in art.audit.histogram, f"{art.type}: no {main} tensor in {art.audit.histogram}"
        m = LlamaCppModel(art.path, n_ctx=64, threads=2)
        try:
            before = len(m.tokenize("Once upon a time"))
            m.generate("Once upon a time", 4)
            assert m.llm.n_tokens > before, art.type
            logits = m.logits([1, 5, 9, 30, 200])
            assert np.isfinite(logits).all(), art.type
        finally:
            m.close()


def test_sizes_follow_nominal_bits(all_types) -> None:
    """Smaller nominal bpw → not a larger file, within the K-quant mixes' slack."""
    by = {a.type: a.audit for a in all_types.artifacts}
    assert by["Q8_0"].bpw > by["Q4_0"].bpw > by["Q2_K"].bpw > by["IQ1_S"].bpw
    for name, au in by.items():
        nominal = GGUF_TYPES[name].bpw
        # 1-D norms stay F32; mixes promote a few tensors: never far below nominal
        assert au.bpw >= nominal * 0.95, (name, au.bpw, nominal)


def test_imatrix_type_without_calibration_fails_before_work(tiny: Path, tmp_path: Path) -> None:
    r = run_cli("convert", str(tiny), "--to", "gguf:IQ2_XS", "-o", str(tmp_path / "o"))
    assert r.returncode == 2
    assert "IQ2_XS need an importance matrix" in r.stderr and "--calib" in r.stderr
    assert not (tmp_path / "o").exists()


def test_overrides_output_and_embedding_types(tiny: Path, tmp_path: Path) -> None:
    from quantkit.quantize.gguf.reader import read_gguf

    out = tmp_path / "o.gguf"
    r = run_cli(
        "convert",
        str(tiny),
        "--to",
        "Q4_K_M",
        "-o",
        str(out),
        "--tensor-type",
        r"attn_v=q8_0",
        "--tensor-type",
        r"blk\.1\.ffn_down=q5_0",
        "--output-type",
        "q6_k",
        "--embedding-type",
        "q4_0",
    )
    assert r.returncode == 0, r.stderr
    types = {t.name: t.type for t in read_gguf(out).tensors}
    assert types["blk.0.attn_v.weight"] == types["blk.1.attn_v.weight"] == "Q8_0"
    assert types["blk.1.ffn_down.weight"] == "Q5_0"
    assert types["output.weight"] == "Q6_K"
    assert types["token_embd.weight"] == "Q4_0"
    assert types["blk.0.attn_q.weight"] == "Q4_K"


def test_pure_and_leave_output(tiny: Path, tmp_path: Path) -> None:
    from quantkit.quantize.gguf.reader import read_gguf

    mixed = tmp_path / "m.gguf"
    pure = tmp_path / "p.gguf"
    assert run_cli("convert", str(tiny), "--to", "Q4_K_M", "-o", str(mixed)).returncode == 0
    r = run_cli("convert", str(tiny), "--to", "Q4_K_M", "-o", str(pure), "--pure", "--leave-output")
    assert r.returncode == 0, r.stderr
    mixed_t = {t.name: t.type for t in read_gguf(mixed).tensors}
    pure_t = {t.name: t.type for t in read_gguf(pure).tensors}
    assert "Q6_K" in mixed_t.values()  # the Q4_K_M mix promotes some tensors
    weights = {n: t for n, t in pure_t.items() if n != "output.weight" and t != "F32"}
    assert set(weights.values()) == {"Q4_K"}
    assert pure_t["output.weight"] == "F32"  # tiny model in F32: left as the base


def test_bad_override_lists_every_offender(tiny: Path, tmp_path: Path) -> None:
    r = run_cli(
        "convert",
        str(tiny),
        "--to",
        "Q4_K_M",
        "-o",
        str(tmp_path / "o.gguf"),
        "--tensor-type",
        "attn_v",
        "--tensor-type",
        "ffn_(=q4_k",
        "--tensor-type",
        "x=q9_9",
    )
    assert r.returncode == 2
    for bit in ("'attn_v' is not PATTERN=TYPE", "'ffn_(' is not a valid regex", "'q9_9'"):
        assert bit in r.stderr, r.stderr


def test_dry_run_writes_nothing_and_predicts_size(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "d"
    r = run_cli(
        "convert", str(tiny), "--to", "Q4_K_M", "--to", "F16", "-o", str(out), "--dry-run", "--json"
    )
    assert r.returncode == 0, r.stderr
    assert not out.exists()
    plan = {a["label"]: a for a in json.loads(r.stdout)["artifacts"]}
    assert plan["Q4_K_M"]["planned"]["blk.0.attn_q.weight"] == "Q4_K"
    assert plan["F16"]["planned"]["blk.0.attn_q.weight"] == "F16"
    assert plan["F16"]["planned"]["blk.0.attn_norm.weight"] == "F32"
    r = run_cli("convert", str(tiny), "--to", "Q4_K_M", "--to", "F16", "-o", str(out), "--json")
    real = {a["label"]: a for a in json.loads(r.stdout)["artifacts"]}
    for t in ("Q4_K_M", "F16"):
        tensor_bytes = real[t]["audit"]["tensor_bytes"]
        assert abs(plan[t]["size"] - tensor_bytes) <= 0.01 * tensor_bytes, (
            t,
            plan[t]["size"],
            tensor_bytes,
        )


def test_demo_q4_k_m_audit(demo_model_dir: Path, tmp_path: Path) -> None:
    """The embedded default (hidden 576) at Q4_K_M: fallbacks listed, bpw consistent."""
    from quantkit.checkpoint import Checkpoint

    out = tmp_path / "q.gguf"
    r = run_cli("convert", str(demo_model_dir), "--to", "Q4_K_M", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    au = json.loads(r.stdout)["artifacts"][0]["audit"]
    assert au["fallback_source"] == "llama.cpp log"
    falls = {f["tensor"]: f for f in au["fallbacks"]}
    assert (
        falls["blk.0.attn_q.weight"]["wanted"] == "Q4_K"
        and falls["blk.0.attn_q.weight"]["got"] == "Q5_0"
    )
    assert all(f["ncols"] % 256 for f in au["fallbacks"])
    with Checkpoint.open(demo_model_dir) as ck:  # independent parameter count (tied: counted once)
        n_params = sum(t.n_elements for t in ck.tensors.values())
    assert au["n_params"] == n_params
    assert au["file_bits_per_weight"] == pytest.approx(out.stat().st_size * 8 / n_params, rel=1e-4)
    # inspect infers the same tensors from shapes alone
    r = run_cli("inspect", str(out), "--json")
    inferred = {f["tensor"] for f in json.loads(r.stdout)["audit"]["fallbacks"]}
    assert inferred == set(falls)
    r = run_cli(
        "convert",
        str(demo_model_dir),
        "--to",
        "Q4_K_M",
        "-o",
        str(tmp_path / "n.gguf"),
        "--no-fallback",
    )
    assert r.returncode == 2 and "cannot get their type" in r.stderr
    assert not (tmp_path / "n.gguf").exists()


def test_types_command() -> None:
    r = run_cli("types", "--json")
    rows = {x["type"]: x for x in json.loads(r.stdout)}
    assert set(rows) == set(GGUF_TYPES)
    assert "trained ternary" in rows["Q2_0"]["note"] and "binary" in rows["Q1_0"]["note"]
    assert rows["IQ2_XS"]["needs_imatrix"] and not rows["Q4_K_M"]["needs_imatrix"]
    assert rows["Q8_0"]["bits_per_weight"] == 8.5
