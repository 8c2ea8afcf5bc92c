"""The numpy float casts every streaming writer uses give torch's and gguf-py's bits."""

from __future__ import annotations

import numpy as np


def _awkward(n: int = 1 << 16) -> np.ndarray:
    rng = np.random.default_rng(0)
    x = rng.standard_normal(n).astype(np.float32) * np.float32(1e3)
    bits = rng.integers(0, 1 << 32, size=n // 4, dtype=np.uint64).astype(np.uint32)
    special = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0, 1e-45, 3.4e38, -3.4e38],
                       dtype=np.float32)  # fmt: skip
    ties = (np.arange(64, dtype=np.uint32) << 16 | 0x8000).view(np.float32)  # exact halfway
    return np.concatenate([x, bits.view(np.float32), special, ties])


def test_f32_to_bf16_matches_torch_and_gguf() -> None:
    import gguf
    import torch

    from quantkit.casts import f32_to_bf16

    x = _awkward()
    got = f32_to_bf16(x)
    assert got.dtype == np.dtype("<u2") and got.shape == x.shape
    want = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(x)
    np.testing.assert_array_equal(got[~nan], want[~nan])
    assert np.isnan(torch.from_numpy(got.view(np.int16)).view(torch.bfloat16).float()[nan]).all()
    ref = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    np.testing.assert_array_equal(got, ref.reshape(x.shape))
    assert f32_to_bf16(x[:4096].reshape(-1, 4)).shape == (1024, 4)


def test_to_f32_widens_exactly() -> None:
    from quantkit.casts import f32_to_bf16, to_f32

    x = _awkward()
    b = f32_to_bf16(x)
    w = to_f32(b, "BF16")
    assert w.dtype == np.float32
    np.testing.assert_array_equal(f32_to_bf16(w), b)  # BF16 → F32 → BF16 is the identity
    h = x[np.isfinite(x) & (np.abs(x) < 6e4)].astype(np.float16)
    np.testing.assert_array_equal(to_f32(h, "F16"), h.astype(np.float32))
    f = np.ones(3, dtype=np.float32)
    assert to_f32(f, "F32") is f  # float32 is not copied
