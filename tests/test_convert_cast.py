"""Float GGUFs are cast block by block with ggml's row converters and written by a background
thread; the files must be byte-identical to the whole-tensor numpy casts they replaced."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np
import pytest
from conftest import fixture_path, make_tiny_model

import quantkit.convert.hf_to_gguf as h2g
from quantkit.convert import cast

FLOATS = ["gguf:F16", "gguf:BF16", "gguf:F32"]


def whole_tensor_cast(
    raw: np.ndarray,
    src: str,
    dst: np.dtype,
    tensor: str,
    clamped: dict[str, float] | None = None,
    where: str = "",
) -> Iterator[np.ndarray]:
    """The cast as it was: numpy on the whole tensor (astype, gguf-py's BF16 rounding)."""
    if dst == np.float16 and src == "F16" or dst == np.uint16 and src == "BF16":
        yield np.ascontiguousarray(raw).reshape(-1)
        return
    f32 = (
        (raw.astype(np.uint32) << 16).view(np.float32) if src == "BF16" else raw.astype(np.float32)
    )
    if dst == np.float32:
        yield np.ascontiguousarray(f32).reshape(-1)
    elif dst == np.float16:
        assert float(np.max(np.abs(f32))) <= h2g.F16_MAX
        yield f32.astype(np.float16).reshape(-1)
    else:
        bf16 = gguf.quants.quantize(f32, gguf.GGMLQuantizationType.BF16).view(np.uint16)
        yield bf16.reshape(-1)


def convert_all(model: Path, out: Path) -> dict[str, bytes]:
    res = h2g.convert(model, FLOATS, out)
    return {a.type: a.path.read_bytes() for a in res.artifacts}


def tiny(root: Path, dtype: str) -> Path:
    """A tiny Llama whose weights reach every cast case: zeros, values that are subnormal in
    F16 (or below its range), and values near the F16 limit."""
    import torch
    from safetensors.torch import load_file, save_file

    d = make_tiny_model(root / dtype, "LlamaForCausalLM", dtype=dtype)
    st = load_file(d / "model.safetensors")
    w = st["model.layers.0.mlp.down_proj.weight"].view(-1)
    w[:64] = 0.0
    w[64:4096] = torch.logspace(-30, 4.8, 4032) * torch.sign(torch.randn(4032))
    save_file(st, d / "model.safetensors", metadata={"format": "pt"})
    return d


@pytest.mark.parametrize(
    "dtype, block", [("bfloat16", h2g.CAST_BLOCK), ("bfloat16", 999), ("float16", 999)]
)
def test_float_files_byte_identical_to_whole_tensor_numpy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dtype: str, block: int
) -> None:
    # 999 elements: every tensor spans several blocks (and ends in a partial one), so the
    # reused buffers go round the ring while the writer thread still holds earlier ones
    model = tiny(tmp_path, dtype)
    monkeypatch.setattr(h2g, "CAST_BLOCK", block)
    new = convert_all(model, tmp_path / "new")
    monkeypatch.setattr(h2g, "_cast", whole_tensor_cast)
    old = convert_all(model, tmp_path / "old")
    for t in old:
        assert new[t] == old[t], f"{t}: bytes differ from the whole-tensor cast"


def test_stories260k_byte_identical(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real trained model in F32: F16 and BF16 round, F32 copies."""
    stories = fixture_path("models", "stories260K")
    monkeypatch.setattr(h2g, "CAST_BLOCK", 1000)
    new = convert_all(stories, tmp_path / "new")
    monkeypatch.setattr(h2g, "_cast", whole_tensor_cast)
    assert new == convert_all(stories, tmp_path / "old")


def test_ggml_row_converters_in_use_and_equal_to_numpy() -> None:
    """llama-cpp-python is installed with quantkit: its converters pass the probe here, and
    agree with numpy on fresh random data of every magnitude."""
    assert cast.backends() == dict.fromkeys(cast.NUMPY, "ggml")
    rng = np.random.default_rng(1)
    bits = rng.integers(0, 1 << 32, size=1 << 18, dtype=np.uint64).astype(np.uint32)
    f32 = bits[(bits & 0x7FFFFFFF) < 0x7F800000].view(np.float32)
    u16 = rng.integers(0, 1 << 16, size=1 << 18, dtype=np.uint32).astype(np.uint16)
    inputs = {
        "bf16_to_f32": u16[(u16 & 0x7FFF) < 0x7F80],
        "f16_to_f32": u16[(u16 & 0x7FFF) < 0x7C00],
        "f32_to_f16": f32,
        "f32_to_bf16": f32,
    }
    for what, row in cast.rows().items():
        x = inputs[what]
        odt = cast.GGML[what][3]
        want, got = np.empty(x.size, odt), np.empty(x.size, odt)
        cast.NUMPY[what](x, want)
        row(x, got)
        assert np.array_equal(want.view(np.uint8), got.view(np.uint8)), what


def test_a_converter_that_disagrees_is_not_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe is what decides: a ggml converter that rounds differently falls back to numpy."""

    def wrong(src: np.ndarray, out: np.ndarray) -> None:
        cast.NUMPY["f32_to_f16"](src, out)
        out.view(np.uint16)[::7] ^= 1

    real = cast._ggml_row

    def sabotaged(fn):  # the F32 → F16 converter made wrong, the others kept
        row = real(fn)
        return wrong if fn.__name__ == "ggml_cpu_fp32_to_fp16" else row

    monkeypatch.setattr(cast, "_ggml_row", sabotaged)
    rows = cast._checked_rows()
    assert rows["f32_to_f16"] is cast.NUMPY["f32_to_f16"]
    assert rows["bf16_to_f32"] is not cast.NUMPY["bf16_to_f32"]
