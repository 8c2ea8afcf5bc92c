"""Real trained models: stories260K (shared fixture) and the embedded SmolLM2-135M-Instruct.

llama.cpp on our GGUF and transformers on the checkpoint must agree on logits; the quantized
Q8_0 file must actually run (docs/decisions.md: the default native llama.cpp build crashed on quantized
files on some CPUs, so this test is what shows a bad build).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import fixture_path, gguf_logits, hf_logits, run_cli

TEXT = (
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. "
    "One day, she saw a big red ball in the park and ran to get it."
)


def _hf_ids(model_dir: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]


def _check_f32(model_dir: Path, out: Path, tol: float) -> tuple[float, np.ndarray, list[int]]:
    from quantkit.convert import convert

    res = convert(model_dir, ["gguf:F32"], out)
    tokens = _hf_ids(model_dir, TEXT)
    ref = hf_logits(model_dir, tokens)
    got = gguf_logits(res.artifacts[0].path, tokens)
    diff = float(np.abs(got - ref).max())
    assert diff <= tol, f"max abs logit diff {diff:.3e}"
    assert (got.argmax(1) == ref.argmax(1)).all(), "argmax differs"
    return diff, ref, tokens


def test_stories260k_f32_matches_transformers(tmp_path: Path) -> None:
    model = fixture_path("models", "stories260K")
    _check_f32(model, tmp_path / "s.gguf", 1e-2)


def test_demo_model_f32_matches_transformers(demo_model_dir: Path, tmp_path: Path) -> None:
    _check_f32(demo_model_dir, tmp_path / "d.gguf", 1e-2)


def test_demo_model_q8_0_runs_close_to_f16(demo_model_dir: Path, tmp_path: Path) -> None:
    from quantkit.convert import convert
    from quantkit.validate.llamacpp import LlamaCppModel

    res = convert(demo_model_dir, ["gguf:F16", "gguf:Q8_0"], tmp_path)
    tokens = _hf_ids(demo_model_dir, TEXT)
    logits = {}
    for art in res.artifacts:
        m = LlamaCppModel(art.path, n_ctx=128, threads=2)
        try:
            logits[art.type] = m.logits(tokens)
            text, _ = m.generate("The capital of France is", 6)
            assert text.strip(), f"{art.type} generated nothing"
        finally:
            m.close()

    def nll(x: np.ndarray) -> float:
        x = x[:-1].astype(np.float64)
        m = x.max(1, keepdims=True)
        lse = m[:, 0] + np.log(np.exp(x - m).sum(1))
        return float((lse - x[np.arange(len(x)), tokens[1:]]).mean())

    ppl16, ppl8 = np.exp(nll(logits["F16"])), np.exp(nll(logits["Q8_0"]))
    assert np.isfinite(ppl8) and ppl16 < 100, (ppl16, ppl8)  # a trained model, not noise
    assert abs(ppl8 / ppl16 - 1) < 0.05, (ppl16, ppl8)
    agree = float((logits["F16"].argmax(1) == logits["Q8_0"].argmax(1)).mean())
    assert agree >= 0.9, agree


def test_demo_command(demo_model_dir: Path, tmp_path: Path) -> None:
    """`quantkit demo --only q8`: the demo recipe's Q8_0 target on the embedded model, scored in
    llama.cpp, with the report table and the chart's path (the full demo: tests/test_demo.py)."""
    out = tmp_path / "demo"
    r = run_cli("demo", "--only", "q8", "-o", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    row = next(ln for ln in r.stdout.splitlines() if ln.startswith("smollm2-135m-instruct-Q8_0"))
    assert row.split()[1] == "Q8_0" and row.split()[-1] == "ok", r.stdout
    assert (out / "q8" / "smollm2-135m-instruct-Q8_0.gguf").is_file()
    assert f"chart: {out / 'report.png'}" in r.stdout and (out / "report.png").is_file()


def test_inspect_json_and_table(demo_model_dir: Path, tmp_path: Path) -> None:
    import json

    out = tmp_path / "q.gguf"
    assert run_cli("convert", str(demo_model_dir), "--to", "Q8_0", "-o", str(out)).returncode == 0
    r = run_cli("inspect", str(out), "--json")
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["metadata"]["general.architecture"] == "llama"
    assert info["type_histogram"]["Q8_0"] > 0 and info["type_histogram"]["F32"] > 0
    assert info["n_params"] > 130_000_000
    # bits per weight = tensor bytes × 8 / parameters; file size adds only the header
    assert abs(info["bits_per_weight"] - info["tensor_bytes"] * 8 / info["n_params"]) < 1e-3
    assert 8.0 < info["bits_per_weight"] < 9.0
    assert info["metadata"]["tokenizer.ggml.tokens"] == {"array": "STRING", "count": 49152}
    r = run_cli("inspect", str(out))
    assert r.returncode == 0 and "bits per weight" in r.stdout and "token_embd.weight" in r.stdout


@pytest.mark.parametrize("bad", [b"", b"GGUF", b"NOPE" + b"\0" * 100])
def test_inspect_rejects_garbage(tmp_path: Path, bad: bytes) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(bad)
    r = run_cli("inspect", str(p))
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr
