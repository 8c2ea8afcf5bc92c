"""Every file type of the installed llama.cpp: the table covers them all; the 2026 ones (NVFP4,
MXFP4_MOE, Q2_0, Q1_0) are written by llama.cpp, load and run; types the gguf package does not
know are named by libggml; binary/ternary types warn on a float model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model
from moe_models import make_case

from quantkit.quantize.gguf.types import GGUF_TYPES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("f") / "tiny", "LlamaForCausalLM")


def test_table_has_every_file_type_of_this_llama_cpp() -> None:
    import llama_cpp

    offered = {
        getattr(llama_cpp, n)
        for n in dir(llama_cpp)
        if n.startswith("LLAMA_FTYPE_") and n != "LLAMA_FTYPE_GUESSED"
    }
    assert {t.ftype for t in GGUF_TYPES.values()} == offered
    for t in GGUF_TYPES.values():  # the name matches llama.cpp's for the ftype
        assert getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{t.name}", None) in (t.ftype, None)


def _runs(path: Path) -> None:
    from quantkit.validate.llamacpp import LlamaCppModel

    m = LlamaCppModel(path, n_ctx=64, threads=2)
    try:
        assert np.isfinite(m.logits([1, 5, 9, 30, 200])).all()
    finally:
        m.close()


def test_nvfp4_q2_0_q1_0_written_named_and_run(tiny: Path, tmp_path: Path) -> None:
    from quantkit.convert import convert
    from quantkit.quantize.gguf.reader import read_gguf

    res = convert(tiny, ["gguf:NVFP4", "gguf:Q2_0", "gguf:Q1_0"], tmp_path)
    by = {a.type: a for a in res.artifacts}
    assert by["NVFP4"].audit.file_type == "NVFP4"  # llama.cpp's ftype 39, set through a kv override
    assert by["NVFP4"].audit.histogram.get("NVFP4", 0) >= 14  # every layer weight
    assert read_gguf(by["NVFP4"].path).metadata["general.file_type"] == GGUF_TYPES["NVFP4"].ftype
    # gguf 0.19 has no Q2_0: the reader names it by libggml's name and size
    assert "Q2_0" in by["Q2_0"].audit.histogram and "Q1_0" in by["Q1_0"].audit.histogram
    for a in res.artifacts:
        assert a.audit.fallbacks == []
        _runs(a.path)
    # a float model in binary / ternary types: one warning each, with the measured cost
    warned = [w for w in res.warnings if "trained with" in w]
    assert len(warned) == 2 and any("Q2_0" in w and "ternary" in w for w in warned)
    assert all("KLD" in w for w in warned)


def test_no_warning_when_weights_are_already_ternary(tiny: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    from quantkit.convert import convert

    ternary = tmp_path / "ternary"
    make_tiny_model(ternary, "LlamaForCausalLM")
    f = ternary / "model.safetensors"
    w = load_file(f)
    for k, v in w.items():
        if "layers." in k and v.ndim == 2:
            # {-s, 0, +s}: a ternary-trained model (BitNet b1.58 rounds |w| below the mean to 0)
            w[k] = (np.sign(v) * (np.abs(v) > np.abs(v).mean()) * 0.05).astype(v.dtype)
    save_file(w, f, metadata={"format": "pt"})
    res = convert(ternary, ["gguf:Q2_0", "gguf:Q1_0"], tmp_path / "o", dry_run=True)
    assert [w for w in res.warnings if "Q2_0" in w] == []  # ternary fits Q2_0
    assert [w for w in res.warnings if "Q1_0" in w]  # but three levels are not binary


def test_mxfp4_moe_on_a_moe(tmp_path: Path) -> None:
    from quantkit.convert import convert

    moe = make_case(tmp_path / "moe", "qwen3moe")
    res = convert(moe, ["gguf:MXFP4_MOE"], tmp_path / "o")
    a = res.artifacts[0]
    assert a.audit.file_type == "MXFP4_MOE"
    assert a.audit.histogram.get("MXFP4", 0) >= 6  # gate/up/down experts of both layers
    assert "Q8_0" in a.audit.histogram  # the rest, as llama.cpp decides for MXFP4_MOE
    _runs(a.path)


def test_auto_types_take_the_new_tensor_types() -> None:
    from quantkit.quantize.gguf.auto.spec import parse_auto

    spec = parse_auto("gguf:auto:bpw=4:types=nvfp4,mxfp4,q2_0,q1_0,q8_0")
    assert spec.types == ("NVFP4", "MXFP4", "Q2_0", "Q1_0", "Q8_0")
