"""Each native architecture: a tiny random model converted to GGUF runs in llama.cpp with the
same logits as transformers (F32), and F16 / Q8_0 outputs load and generate."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import gguf_logits, hf_logits, make_tiny_model

TOKENS = [1, 17, 250, 3, 99, 400, 12, 7, 300, 45, 2, 64, 128, 511, 5, 77, 200, 33, 90, 8] * 2

# (id, HF architecture, config overrides): GQA everywhere (4 heads, 2 KV heads).
CASES = [
    ("llama", "LlamaForCausalLM", {}),
    (
        "llama-bias-llama3rope",
        "LlamaForCausalLM",
        {
            "attention_bias": True,
            "rope_parameters": {
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            },
        },
    ),
    (
        "llama-linear-rope-tied",
        "LlamaForCausalLM",
        {
            "tie_word_embeddings": True,
            "rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
        },
    ),
    ("mistral", "MistralForCausalLM", {"head_dim": 96, "sliding_window": None}),
    ("qwen2", "Qwen2ForCausalLM", {"tie_word_embeddings": True}),
    (
        "qwen2-yarn",
        "Qwen2ForCausalLM",
        {
            "rope_parameters": {
                "rope_type": "yarn",
                "rope_theta": 10000.0,
                "factor": 4.0,
                "original_max_position_embeddings": 64,
            },
        },
    ),
    ("qwen3", "Qwen3ForCausalLM", {"head_dim": 128}),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("archs")


@pytest.mark.parametrize("case,arch,overrides", CASES, ids=[c[0] for c in CASES])
def test_f32_logits_match_transformers(
    workdir: Path, case: str, arch: str, overrides: dict
) -> None:
    from quantkit.convert import convert

    model = make_tiny_model(workdir / case, arch, **overrides)
    res = convert(model, ["gguf:F32"], workdir / f"{case}-F32.gguf")
    ref = hf_logits(model, TOKENS)
    got = gguf_logits(res.artifacts[0].path, TOKENS)
    assert got.shape == ref.shape
    diff = float(np.abs(got - ref).max())
    assert diff <= 1e-3, f"{case}: max abs logit diff {diff:.2e}"
    assert (got.argmax(1) == ref.argmax(1)).all(), f"{case}: argmax differs"


@pytest.mark.parametrize(
    "case,arch,overrides", [CASES[0], CASES[4], CASES[6]], ids=["llama", "qwen2", "qwen3"]
)
def test_f16_and_q8_load_and_generate(workdir: Path, case: str, arch: str, overrides: dict) -> None:
    from quantkit.convert import convert
    from quantkit.quantize.gguf.reader import read_gguf
    from quantkit.validate.llamacpp import LlamaCppModel

    model = make_tiny_model(workdir / f"{case}-gen", arch, **overrides)
    res = convert(model, ["gguf:F16", "gguf:Q8_0"], workdir / f"{case}-out")
    assert [a.type for a in res.artifacts] == ["F16", "Q8_0"]
    ref = hf_logits(model, TOKENS)
    for art in res.artifacts:
        info = read_gguf(art.path)
        weights = {t.type for t in info.tensors if len(t.shape) == 2}
        assert weights == {art.type}, f"{art.type}: 2-D tensors are {weights}"
        m = LlamaCppModel(art.path, n_ctx=128, threads=2)
        try:
            text, _ = m.generate("Once upon a time", 8)
            assert m.llm.n_tokens > len(m.tokenize("Once upon a time"))  # it produced tokens
            got = m.logits(TOKENS)
        finally:
            m.close()
        # a quantized file is not exact, but must be close to the reference
        assert float(np.abs(got - ref).max()) < 0.5, art.type
        # random weights give near-ties, so a few argmax flips under Q8_0 are expected
        assert (got.argmax(1) == ref.argmax(1)).mean() >= 0.75, art.type


def test_sharded_checkpoint_gives_the_same_file(workdir: Path) -> None:
    """model.safetensors.index.json + shards convert to the same bytes as one file."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.convert import convert

    single = make_tiny_model(workdir / "single" / "m", "Qwen2ForCausalLM")
    model = AutoModelForCausalLM.from_pretrained(single, dtype=torch.float32)
    sharded = workdir / "sharded" / "m"
    model.save_pretrained(sharded, max_shard_size="300KB")
    for f in single.glob("tokenizer*"):
        (sharded / f.name).write_bytes(f.read_bytes())
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("*.safetensors"))) > 2
    a = convert(single, ["F16"], workdir / "single" / "out.gguf").artifacts[0].path
    b = convert(sharded, ["F16"], workdir / "sharded" / "out.gguf").artifacts[0].path
    assert a.read_bytes() == b.read_bytes()


def test_bf16_checkpoint(workdir: Path) -> None:
    """BF16 weights: BF16 output keeps their exact bits; F32 output matches transformers."""
    import gguf

    from quantkit.convert import convert

    model = make_tiny_model(workdir / "bf16", "LlamaForCausalLM", dtype="bfloat16")
    res = convert(model, ["F32", "BF16"], workdir / "bf16-out")
    ref = hf_logits(model, TOKENS)  # bf16 weights widened to f32 exactly
    got = gguf_logits(res.artifacts[0].path, TOKENS)
    assert float(np.abs(got - ref).max()) <= 1e-3
    from safetensors import safe_open

    reader = gguf.GGUFReader(res.artifacts[1].path)
    emb = next(t for t in reader.tensors if t.name == "token_embd.weight")
    assert emb.tensor_type == gguf.GGMLQuantizationType.BF16
    with safe_open(model / "model.safetensors", "pt") as f:
        want = f.get_tensor("model.embed_tokens.weight").view(__import__("torch").int16).numpy()
    assert np.array_equal(np.asarray(emb.data).view(np.int16).reshape(want.shape), want)
