"""Gemma 2, Gemma 3 (text) and Phi-3 converted natively: tiny random models built from
transformers configs, F32 logits in llama.cpp against transformers (eager), and F16 / Q8_0 /
Q4_K_M files that load and generate.

Gemma's MLP is GELU, and llama.cpp's CPU GELU is a float16 lookup table (ggml-cpu/vec.h defines
GGML_GELU_FP16: the input is rounded to f16 and the table holds f16 results). That alone moves
logits of these random models by ~1e-2, and float32-level differences upstream flip table entries
(measured: a 1e-7 relative perturbation of the GELU inputs moves transformers' own logits by
~4e-4). So the Gemma check is in two parts: against transformers with the engine's GELU table
emulated, where what is left is that flip noise, and against plain transformers, where the
argmax must agree at every position and the difference must stay at f16 precision of the logits.
A conversion mistake (a norm without its +1, a missing attention scale, a window off by one, the
wrong RoPE base on local layers) moves logits by ≫ 0.1.
"""

from __future__ import annotations

import io
import math
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import TRAIN_TEXT, gguf_logits, make_tiny_model

TOKENS = [1, 17, 250, 3, 99, 400, 12, 7, 300, 45, 2, 64, 128, 511, 5, 77, 200, 33, 90, 8] * 2

# |llama.cpp − transformers with ggml's f16 GELU table| (measured ≤ 1.6e-3 on 2-layer models)
GELU_EMULATED_TOL = 3e-3
# |llama.cpp − plain transformers| relative to the largest logit: f16 has 2^-11 ≈ 4.9e-4
# relative precision (measured ≤ 6e-4 of the largest logit)
GELU_PLAIN_REL_TOL = 1.5e-3

SWA = 8  # sliding window, shorter than the 40 test tokens

CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "gemma2": (
        "Gemma2ForCausalLM",
        {
            "head_dim": 64,
            "sliding_window": SWA,  # layer 0 sliding, layer 1 global (HF's default pattern)
            "query_pre_attn_scalar": 48,  # ≠ head_dim: llama.cpp's built-in scale is folded
            "attn_logit_softcapping": 2.0,  # small enough to bite on these scores
            "final_logit_softcapping": 30.0,
        },
    ),
    "gemma3": (
        "Gemma3ForCausalLM",
        {
            "head_dim": 64,
            "sliding_window": SWA,
            "layer_types": ["sliding_attention", "full_attention"],
            "query_pre_attn_scalar": 48,
            "final_logit_softcapping": 20.0,
            "tie_word_embeddings": False,  # llama.cpp's gemma3 takes an output tensor too
            "rope_parameters": {
                "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
            },
        },
    ),
    "phi3": (
        "Phi3ForCausalLM",
        {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0},
    ),
    # llama.cpp picks the short LongRoPE factors while its context (padded to 256) is within
    # the original one, transformers while the sequence is: both short here ...
    "phi3-longrope-short": (
        "Phi3ForCausalLM",
        {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "max_position_embeddings": 1024,
            "original_max_position_embeddings": 256,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "original_max_position_embeddings": 256,
                "long_factor": [round(1.0 + 0.25 * i, 3) for i in range(32)],
                "short_factor": [round(1.0 + 0.1 * i, 3) for i in range(32)],
            },
        },
    ),
    # ... and both long here (40 tokens past an original 32, in a 256 context)
    "phi3-longrope": (
        "Phi3ForCausalLM",
        {
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 0,
            "tie_word_embeddings": True,
            "sliding_window": 64,  # written, as llama.cpp reads it (it runs Phi-3 without it)
            "max_position_embeddings": 256,
            "original_max_position_embeddings": 32,
            "rope_parameters": {
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,  # Phi-4-mini style: 48 of 64 dims rotate
                "original_max_position_embeddings": 32,
                "long_factor": [round(1.0 + 0.25 * i, 3) for i in range(24)],
                "short_factor": [round(1.0 + 0.02 * i, 3) for i in range(24)],
            },
        },
    ),
}


# With tied embeddings scaled by sqrt(hidden_size), a random Gemma's top token is the input token
# at every position, which would make the argmax check vacuous; shrinking the embeddings lets the
# layers decide it (measured: the input token is the top one at 7 of 40 positions).
EMBED_SCALE = {"gemma2": 0.3}


# -- tokenizers -----------------------------------------------------------------------------------
def _train_spm(out: Path, **kw: Any) -> None:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TRAIN_TEXT.split(". ")),
        model_writer=buf,
        model_type="bpe",
        vocab_size=500,
        byte_fallback=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        split_digits=True,
        hard_vocab_limit=False,
        minloglevel=2,
        **kw,
    )
    (out / "tokenizer.model").write_bytes(buf.getvalue())


def save_gemma_tokenizer(out: Path) -> None:
    """Gemma's layout: SentencePiece BPE, byte fallback, no dummy prefix, ids pad 0 eos 1 bos 2
    unk 3, turn markers as user-defined pieces; saved by transformers' GemmaTokenizer."""
    from transformers import GemmaTokenizer

    _train_spm(
        out,
        add_dummy_prefix=False,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
    )
    GemmaTokenizer.from_pretrained(str(out), add_bos_token=True).save_pretrained(out)


def save_phi3_tokenizer(out: Path) -> None:
    """Phi-3's layout: Llama SentencePiece (<unk> <s> </s>) plus added chat tokens. llama.cpp's
    vocab loader looks up </s>, <unk>, <s> and <|endoftext|> for models named "phi3"."""
    from transformers import LlamaTokenizer

    _train_spm(out, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)
    tok = LlamaTokenizer.from_pretrained(str(out))
    tok.add_tokens(["<|endoftext|>", "<|end|>", "<|user|>", "<|assistant|>"], special_tokens=True)
    tok.save_pretrained(out)


def _replace_tokenizer(model_dir: Path, arch: str) -> None:
    for f in model_dir.glob("*token*"):
        f.unlink()
    (save_gemma_tokenizer if arch.startswith("Gemma") else save_phi3_tokenizer)(model_dir)


# -- references -----------------------------------------------------------------------------------
def _ggml_gelu(x: Any) -> Any:
    """ggml's CPU GELU: f16 input → table of f16 results of the tanh formula; ±10 clamps."""
    import torch

    v = x.half().float()
    inner = 0.79788456080286535587989211986876 * v * (1.0 + 0.044715 * v * v)
    y = (0.5 * v * (1.0 + torch.tanh(inner))).half().float()
    return torch.where(x <= -10.0, torch.zeros_like(x), torch.where(x >= 10.0, x, y))


def reference_logits(model_dir: Path, tokens: list[int]) -> tuple[np.ndarray, np.ndarray | None]:
    """transformers (eager, float32) logits, and for GELU models the same with ggml's GELU."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    ids = torch.tensor([tokens])
    with torch.no_grad():
        plain = model(ids).logits[0].numpy()
        if not hasattr(model.model.layers[0].mlp, "act_fn") or "Gemma" not in type(model).__name__:
            return plain, None

        class GGMLGelu(torch.nn.Module):
            def forward(self, x: Any) -> Any:
                return _ggml_gelu(x)

        for layer in model.model.layers:
            layer.mlp.act_fn = GGMLGelu()
        return plain, model(ids).logits[0].numpy()


class Built:
    def __init__(self, case: str, arch: str, path: Path, ref: np.ndarray, emul: np.ndarray | None):
        self.case, self.arch, self.path, self.ref, self.emul = case, arch, path, ref, emul


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gemma-phi3")


@pytest.fixture(scope="module")
def built(workdir: Path) -> dict[str, Built]:
    """Every case's model (with its family's tokenizer) and reference logits, built once."""
    out = {}
    for case, (arch, overrides) in CASES.items():
        model = make_tiny_model(workdir / case, arch, **overrides)
        _replace_tokenizer(model, arch)
        if case in EMBED_SCALE:
            from safetensors.numpy import load_file, save_file

            weights = load_file(model / "model.safetensors")
            weights["model.embed_tokens.weight"] *= np.float32(EMBED_SCALE[case])
            save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
        out[case] = Built(case, arch, model, *reference_logits(model, TOKENS))
    return out


# -- F32: exact -----------------------------------------------------------------------------------
@pytest.mark.parametrize("case", list(CASES))
def test_f32_logits_match_transformers(built: dict[str, Built], workdir: Path, case: str) -> None:
    from quantkit.convert import convert

    b = built[case]
    res = convert(b.path, ["gguf:F32"], workdir / f"{case}-F32.gguf")
    got = gguf_logits(res.artifacts[0].path, TOKENS)
    assert got.shape == b.ref.shape
    diff = float(np.abs(got - b.ref).max())
    assert (got.argmax(1) == b.ref.argmax(1)).all(), f"{case}: argmax differs"
    assert (b.ref.argmax(1) != np.array(TOKENS)).sum() >= 10, "argmax check is vacuous"
    # figures for the record: pytest -s -k f32 prints them
    extra = "" if b.emul is None else f", {float(np.abs(got - b.emul).max()):.2e} with ggml's GELU"
    print(f"\n{case}: max |Δ| {diff:.2e}{extra}, largest logit {float(np.abs(b.ref).max()):.1f}")
    if b.emul is None:
        assert diff <= 1e-3, f"{case}: max abs logit diff {diff:.2e}"
        return
    emul = float(np.abs(got - b.emul).max())
    scale = float(np.abs(b.ref).max())
    assert emul <= GELU_EMULATED_TOL, f"{case}: {emul:.2e} from transformers with ggml's GELU"
    assert diff <= GELU_PLAIN_REL_TOL * scale, f"{case}: {diff:.2e} (largest logit {scale:.1f})"


# -- what the files say ---------------------------------------------------------------------------
def _kv(reader: Any, key: str) -> Any:
    f = reader.fields[key]
    vals = [f.parts[i].tolist() for i in f.data]
    return [v[0] if len(v) == 1 else v for v in vals] if len(vals) > 1 else vals[0][0]


def test_gemma3_metadata_and_norm_offset(built: dict[str, Built], workdir: Path) -> None:
    import gguf
    from safetensors import safe_open

    from quantkit.convert import convert

    b = built["gemma3"]
    path = workdir / "gemma3-meta.gguf"
    convert(b.path, ["gguf:F32"], path)
    r = gguf.GGUFReader(path)
    assert _kv(r, "gemma3.attention.sliding_window") == SWA
    assert _kv(r, "gemma3.attention.sliding_window_pattern") == [True, False]
    assert _kv(r, "gemma3.rope.freq_base_swa") == 100.0
    assert _kv(r, "gemma3.rope.freq_base") == 10000.0
    assert _kv(r, "gemma3.rope.scaling.factor") == 4.0
    assert _kv(r, "gemma3.final_logit_softcapping") == 20.0
    tensors = {t.name: np.asarray(t.data) for t in r.tensors}
    assert tensors["output.weight"].shape == (512, 256)  # untied
    with safe_open(b.path / "model.safetensors", "np") as f:
        norm = f.get_tensor("model.layers.0.input_layernorm.weight")
        qn = f.get_tensor("model.layers.0.self_attn.q_norm.weight")
    np.testing.assert_array_equal(tensors["blk.0.attn_norm.weight"], norm + np.float32(1))
    fix = np.float32(math.sqrt(64 / 48))  # 48**-0.5 / 64**-0.5
    np.testing.assert_allclose(tensors["blk.0.attn_q_norm.weight"], (qn + 1) * fix, rtol=1e-6)


def test_gemma2_keys(built: dict[str, Built], workdir: Path) -> None:
    import gguf

    from quantkit.convert import convert

    path = workdir / "gemma2-meta.gguf"
    convert(built["gemma2"].path, ["gguf:F32"], path)
    r = gguf.GGUFReader(path)
    assert _kv(r, "gemma2.attn_logit_softcapping") == 2.0
    assert _kv(r, "gemma2.final_logit_softcapping") == 30.0
    assert _kv(r, "gemma2.attention.sliding_window") == SWA
    assert _kv(r, "gemma2.attention.sliding_window_pattern") == [True, False]
    assert _kv(r, "gemma2.attention.key_length") == 64


# -- quantized: load and generate -----------------------------------------------------------------
@pytest.mark.parametrize("case", ["gemma2", "gemma3", "phi3-longrope"])
def test_f16_q8_q4km_load_and_generate(built: dict[str, Built], workdir: Path, case: str) -> None:
    from quantkit.convert import convert
    from quantkit.validate.llamacpp import LlamaCppModel

    b = built[case]
    res = convert(b.path, ["gguf:F16", "gguf:Q8_0", "gguf:Q4_K_M"], workdir / f"{case}-q")
    assert [a.type for a in res.artifacts] == ["F16", "Q8_0", "Q4_K_M"]
    for art in res.artifacts:
        weights = {t["type"] for t in art.audit.tensors if len(t["shape"]) == 2}
        if art.type == "Q4_K_M":
            assert weights <= {"Q4_K", "Q6_K"} and "Q4_K" in weights, weights
        else:
            assert weights == {art.type}, f"{art.type}: 2-D tensors are {weights}"
        m = LlamaCppModel(art.path, n_ctx=128, threads=2)
        try:
            prompt = "Once upon a time"
            m.generate(prompt, 8)
            assert m.llm.n_tokens > len(m.tokenize(prompt))  # it produced tokens
            got = m.logits(TOKENS)
        finally:
            m.close()
        err = np.abs(got - b.ref)
        agree = float((got.argmax(1) == b.ref.argmax(1)).mean())
        # random weights have near-ties, so a quantized file flips some argmaxes
        floor = {"F16": 0.9, "Q8_0": 0.75, "Q4_K_M": 0.4}[art.type]
        assert agree >= floor, f"{case} {art.type}: top-1 agreement {agree:.2f}"
        corr = float(np.corrcoef(got.ravel(), b.ref.ravel())[0, 1])
        # measured: F16 ≥ 0.99999, Q8_0 ≥ 0.998, Q4_K_M 0.90-0.96 (random weights quantize badly)
        assert corr > {"F16": 0.9999, "Q8_0": 0.995, "Q4_K_M": 0.8}[art.type], (art.type, corr)
        if art.type == "F16":
            assert float(err.max()) < 0.5


# -- tokenizer ------------------------------------------------------------------------------------
GEMMA_TEXT = (
    "<start_of_turn>user\nHello  world, Bolt counts 1234 and Mia\twrites code.<end_of_turn>\n"
    "<start_of_turn>model\n Café, 東京 — done.<end_of_turn>"
)


@pytest.mark.parametrize("files", ["tokenizer.model+json", "tokenizer.json only"])
def test_gemma_tokenizer_matches_transformers(
    built: dict[str, Built], workdir: Path, files: str
) -> None:
    """The converted Gemma file tokenizes as transformers does: no dummy prefix, byte fallback,
    turn markers; also when only transformers 5's tokenizer.json is there."""
    import transformers

    from quantkit.convert import convert
    from quantkit.validate.llamacpp import LlamaCppModel

    src = built["gemma3"].path
    model = workdir / f"gemma3-tok-{files.split()[0]}"
    if model.exists():
        shutil.rmtree(model)
    shutil.copytree(src, model)
    if files == "tokenizer.json only":
        (model / "tokenizer.model").unlink()
    path = convert(model, ["gguf:F16"], workdir / f"{model.name}.gguf").artifacts[0].path
    hf = transformers.AutoTokenizer.from_pretrained(str(model))
    m = LlamaCppModel(path, n_ctx=128, threads=2)
    try:
        for add in (True, False):
            want = hf(GEMMA_TEXT, add_special_tokens=add)["input_ids"]
            assert m.tokenize(GEMMA_TEXT, add_bos=add, special=True) == want, add
    finally:
        m.close()


# -- refused configurations -----------------------------------------------------------------------
def _config(arch: str, **kw: Any) -> dict[str, Any]:
    base = {
        "architectures": [arch],
        "hidden_size": 256,
        "intermediate_size": 512,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "vocab_size": 512,
    }
    return {**base, **kw}


def test_settings_llama_cpp_cannot_compute_are_refused_at_once() -> None:
    from quantkit.convert.archs import resolve
    from quantkit.errors import CheckpointError, UnsupportedArchitectureError

    with pytest.raises(CheckpointError) as e:
        resolve(_config("Gemma2ForCausalLM", tie_word_embeddings=False, hidden_activation="gelu"))
    assert "untied lm_head" in str(e.value) and "'gelu'" in str(e.value)
    with pytest.raises(CheckpointError, match="attn_logit_softcapping"):
        resolve(_config("Gemma3ForCausalLM", attn_logit_softcapping=50.0))
    with pytest.raises(CheckpointError, match="hidden_size"):
        resolve(_config("Phi3ForCausalLM", head_dim=32))
    # a refusal is not "unsupported architecture": a fallback converter would not help
    assert not issubclass(CheckpointError, UnsupportedArchitectureError)
    # the released configurations pass, with no query-scale fix needed
    g2 = resolve(_config("Gemma2ForCausalLM", head_dim=256, query_pre_attn_scalar=256))
    assert g2.q_fix == 1.0 and g2.sliding == [True, False]
    # Gemma 2 27B: llama.cpp scales by n_embd/n_head at 46 layers, which is what the config says
    g27 = resolve(
        _config(
            "Gemma2ForCausalLM",
            hidden_size=4608,
            num_attention_heads=32,
            num_hidden_layers=46,
            head_dim=128,
            query_pre_attn_scalar=144,
        )
    )
    assert g27.q_fix == pytest.approx(1.0)
    # an old Gemma 3 config (no layer_types): HF's period of 6
    g3 = resolve(_config("Gemma3ForCausalLM", num_hidden_layers=7, sliding_window=512))
    assert g3.sliding == [True] * 5 + [False, True]


def test_registry_lists_the_new_architectures() -> None:
    from quantkit.convert.archs import supported

    assert {"Gemma2ForCausalLM", "Gemma3ForCausalLM", "Phi3ForCausalLM"} <= set(supported())


def test_gemma2_disabled_caps_become_identity_caps(tmp_path: Path) -> None:
    """llama.cpp's Gemma 2 graph always soft-caps; a config with the caps off gets caps far
    above any logit (tanh(x/c)·c = x to float precision), not llama.cpp's defaults of 50/30."""
    import gguf

    from quantkit.convert.archs import resolve
    from quantkit.convert.archs.gemma import NO_CAP

    arch = resolve(
        _config("Gemma2ForCausalLM", attn_logit_softcapping=None, final_logit_softcapping=None)
    )
    w = gguf.GGUFWriter(str(tmp_path / "keys.gguf"), arch.arch_name)
    arch.write_hparams(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(tmp_path / "keys.gguf")
    assert _kv(r, "gemma2.attn_logit_softcapping") == NO_CAP
    assert _kv(r, "gemma2.final_logit_softcapping") == NO_CAP
    # x = 30 (a large score): relative change of the cap, in float32
    x = np.float32(30.0)
    assert abs(np.tanh(x / np.float32(NO_CAP)) * np.float32(NO_CAP) - x) <= 1e-5 * x
