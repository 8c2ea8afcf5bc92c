"""The fallback: architectures with no native class convert through llama.cpp's own
convert_hf_to_gguf.py (of the engine's version), wrapped by quantkit, and match transformers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY, gguf_logits, hf_logits, run_cli, save_bpe_tokenizer

TOKENS = [1, 17, 250, 3, 99, 400, 12, 7, 300, 45, 2, 64, 128, 511, 5, 77, 200, 33, 90, 8] * 2

# Architectures quantkit has no class for, that llama.cpp's converter of 0.3.36 converts exactly
# and transformers builds offline. (GPT2LMHeadModel and GPTNeoXForCausalLM fail inside that
# converter with transformers 5 configs: KeyError 'n_ctx' / 'rotary_pct'.)
FALLBACK = [("OlmoForCausalLM", "OlmoConfig"), ("StableLmForCausalLM", "StableLmConfig")]


def make_model(out: Path, arch: str, config_cls: str, seed: int = 0) -> Path:
    import torch
    import transformers

    config = getattr(transformers, config_cls)(**TINY)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name and name.endswith("weight"):
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_bpe_tokenizer(out, TINY["vocab_size"])
    return out


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("upstream")


@pytest.fixture(scope="module")
def models(workdir: Path) -> dict[str, Path]:
    pytest.importorskip("llama_cpp")
    from quantkit.convert.upstream import source_dir
    from quantkit.errors import EngineError

    try:
        source_dir()
    except EngineError as e:
        pytest.skip(f"llama.cpp's converter is not available: {e}")
    return {arch: make_model(workdir / arch, arch, cfg) for arch, cfg in FALLBACK}


def test_archs_lists_native_and_upstream(models: dict[str, Path]) -> None:
    from quantkit.convert.archs import REGISTRY
    from quantkit.convert.upstream import source_dir

    r = run_cli("archs", "--json")
    assert r.returncode == 0, r.stderr
    data = json.loads(r.stdout)
    rows = {a["architecture"]: a for a in data["architectures"]}
    assert {n for n, a in rows.items() if a["converter"] == "native"} == set(REGISTRY)
    upstream = {n for n, a in rows.items() if a["converter"] == "upstream"}
    for arch, _ in FALLBACK:
        assert arch in upstream
    # read from the converter itself: each listed name is registered in its source
    text = "".join(p.read_text() for p in (source_dir() / "conversion").glob("*.py"))
    assert all(f'"{n}"' in text for n in upstream)
    assert "NotAModelForCausalLM" not in rows
    human = run_cli("archs")
    assert "OlmoForCausalLM" in human.stdout and "llama.cpp (fallback)" in human.stdout


@pytest.mark.parametrize("arch", [a for a, _ in FALLBACK])
def test_fallback_f32_matches_transformers(
    workdir: Path, models: dict[str, Path], arch: str
) -> None:
    import gguf

    from quantkit.convert.upstream import bpe_pre

    out = workdir / f"{arch}-F32.gguf"
    r = run_cli("convert", str(models[arch]), "--to", "gguf:F32", "-o", str(out), "--json")
    assert r.returncode == 0, r.stderr
    assert "llama.cpp's own convert_hf_to_gguf.py" in r.stderr  # the fallback notice
    res = json.loads(r.stdout)
    assert res["converter"] == "upstream" and res["notes"] == []
    # llama.cpp's converter cannot hash-identify a retrained BPE vocabulary; quantkit supplied it
    pre = gguf.GGUFReader(out).fields["tokenizer.ggml.pre"].contents()
    assert pre == bpe_pre(models[arch]) and pre
    ref = hf_logits(models[arch], TOKENS)
    got = gguf_logits(out, TOKENS)
    diff = float(np.abs(got - ref).max())
    assert diff <= 1e-3, f"{arch}: max abs logit diff {diff:.2e}"
    assert (got.argmax(1) == ref.argmax(1)).all()


def test_fallback_quantizes_and_audits(workdir: Path, models: dict[str, Path]) -> None:
    from quantkit.convert import convert
    from quantkit.validate.llamacpp import LlamaCppModel

    model = models["OlmoForCausalLM"]
    res = convert(model, ["F32", "Q8_0"], workdir / "olmo-q")  # one converter run: F32 is the base
    assert res.converter == "upstream"
    assert [a.type for a in res.artifacts] == ["F32", "Q8_0"]
    assert not list((workdir / "olmo-q").glob("*.tmp*"))  # no scratch left behind
    for a in res.artifacts:
        assert a.audit is not None and a.audit.file_type == a.type
        assert a.audit.histogram.get(a.type, 0) >= 2 * 4  # attention + ffn weights per layer
        m = LlamaCppModel(a.path, n_ctx=128, threads=2)
        try:
            m.generate("Once upon a time", 4)
            assert m.llm.n_tokens > len(m.tokenize("Once upon a time"))
        finally:
            m.close()


def test_converter_choice_and_errors(workdir: Path, models: dict[str, Path]) -> None:
    model = models["OlmoForCausalLM"]
    r = run_cli("convert", str(model), "--to", "F16", "-o", str(workdir / "x.gguf"),
                "--converter", "native")  # fmt: skip
    assert r.returncode == 2 and "not supported" in r.stderr and "Traceback" not in r.stderr
    # a config llama.cpp's converter chokes on: its error comes back as one quantkit line
    broken = workdir / "broken"
    broken.mkdir()
    for f in model.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    from safetensors.numpy import load_file, save_file

    weights = load_file(broken / "model.safetensors")
    weights["model.layers.0.mlp.bogus.weight"] = np.zeros((4, 4), dtype=np.float32)
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    r = run_cli("convert", str(broken), "--to", "F16", "-o", str(workdir / "b.gguf"))
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("quantkit: error")]
    assert r.returncode == 3 and len(lines) == 1, r.stderr
    assert "llama.cpp's converter failed" in lines[0] and "Traceback" not in r.stderr
    assert not (workdir / "b.gguf").exists()
    assert not [p for p in workdir.iterdir() if p.name.startswith(".b.gguf")]
