"""Float casts in numpy, for every path that streams weights without torch.

numpy has no bfloat16: BF16 travels as its uint16 bit pattern, the high half of a float32.
Widening to float32 is exact; narrowing rounds to nearest even and keeps NaN quiet, as torch's
``.to(torch.bfloat16)`` (c10/util/BFloat16.h ``round_to_nearest_even``) and gguf-py's
``quants.quantize(..., BF16)`` do, so a file written here holds the bytes those tools write.
"""

from __future__ import annotations

import numpy as np

F16_MAX = 65504.0  # largest finite IEEE half


def to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A stored array (its safetensors dtype; BF16 as uint16 bits) as float32, exactly; a
    float32 array comes back as it is, not copied."""
    if dtype == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32, copy=False)


def f32_to_bf16(f32: np.ndarray) -> np.ndarray:
    """float32 → BF16 bits (little-endian uint16, same shape), round to nearest even; a NaN
    stays a quiet NaN with its sign (uint32 overflow of the rounding add only hits NaNs,
    which are replaced)."""
    u = np.ascontiguousarray(f32, dtype=np.float32).view(np.uint32)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + (0x7FFF + ((u >> 16) & 1))) >> 16).astype("<u2")
    if nan.any():
        r[nan] = ((u[nan] >> 16) | 0x40).astype("<u2")
    return r
