"""The candidate schemes of ``gptq:auto``: what each stores per weight and how it is written.

Bits are counted as llm-compressor 0.14 / compressed-tensors 0.19 write the tensors of one
Linear (``pack-quantized`` and ``float-quantized`` formats, checked against the files in
tests/test_vllm_auto.py):

- ``wNgG`` (int, symmetric, W{N}A16): ``weight_packed`` int32 holding N-bit values along the
  input dimension, ``weight_scale`` [out, in/G] in the checkpoint's dtype, ``weight_shape``
  int64[2]; no zero point (symmetric).
- ``fp8`` (FP8_DYNAMIC preset): ``weight`` float8_e4m3fn, ``weight_scale`` [out, 1] in the
  checkpoint's dtype; activations are quantized per token at run time (nothing stored).
- ``int8`` (W8A8 preset, INT8 weights and activations): ``weight`` int8, ``weight_scale``
  [out, 1] in the checkpoint's dtype; activations quantized per token at run time. The mix is
  planned from the weights' error (as every scheme here); what per-token int8 activations add is
  not in the prediction.
- ``float``: the weight as it is (the layer goes to the ignore list).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from quantkit.quantize.vllm.targets import INT8_ACTIVATIONS, INT8_WEIGHTS, int_weights_args

SHAPE_BITS = 2 * 64  # weight_shape: int64[2] per packed Linear


@dataclass(frozen=True)
class Scheme:
    name: str  # as written in types= (w4g128, fp8, float)
    kind: str  # "int", "fp8", "int8" (W8A8) or "float"
    bits: int  # bits of one stored weight value (float: the checkpoint's dtype)
    group: int | None = None  # int: input columns per scale; None for fp8/float

    def fits(self, in_features: int) -> bool:
        """Whether a Linear of this input width can take the scheme (groups must divide it)."""
        return self.group is None or in_features % self.group == 0

    def cost_bits(self, out_f: int, in_f: int, dtype_bits: int) -> int:
        """Exact bits of one Linear's stored tensors (module doc)."""
        if self.kind == "float":
            return out_f * in_f * dtype_bits
        if self.kind in ("fp8", "int8"):
            return out_f * in_f * 8 + out_f * dtype_bits
        assert self.group is not None
        words = math.ceil(in_f * self.bits / 32)  # int32 words per packed row
        return out_f * words * 32 + out_f * (in_f // self.group) * dtype_bits + SHAPE_BITS

    def weights_args(self) -> dict[str, Any] | None:
        """compressed-tensors QuantizationArgs of the weights; None for float."""
        if self.kind == "int":  # as a gptq target with its default static activation order
            return int_weights_args(self.bits, self.group, actorder="static")
        if self.kind == "fp8":  # compressed-tensors' FP8_DYNAMIC preset
            return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "channel"}
        if self.kind == "int8":  # the W8A8 preset, as --to int8 writes it
            return dict(INT8_WEIGHTS)
        return None

    def activation_args(self) -> dict[str, Any] | None:
        if self.kind == "fp8":  # FP8_DYNAMIC: per token, scales computed at run time
            return {"num_bits": 8, "type": "float", "symmetric": True, "strategy": "token",
                    "dynamic": True}  # fmt: skip
        if self.kind == "int8":
            return dict(INT8_ACTIVATIONS["dynamic"])
        return None

    def capability_row(self, dtype: str) -> str:
        """The row of validate/capabilities.py that says whether vLLM runs this scheme here
        (``dtype``: the checkpoint's, f32/f16/bf16)."""
        if self.kind == "float":
            return f"hf:{dtype}"
        if self.kind == "fp8":
            return f"fp8-dynamic:{dtype}"
        if self.kind == "int8":
            return f"w8a8-int8:{dtype}"
        return f"w{self.bits}a16-g{self.group}:{dtype}"


_NAME = re.compile(r"^w(4|8)g(32|64|128)$")
FLOAT = Scheme("float", "float", 16)
FP8 = Scheme("fp8", "fp8", 8)
INT8 = Scheme("int8", "int8", 8)


def scheme(name: str) -> Scheme | None:
    """``w4g128`` / ``w8g64`` / ``fp8`` / ``int8`` / ``float`` → Scheme; None for any other."""
    n = name.strip().lower()
    if n == "float":
        return FLOAT
    if n == "fp8":
        return FP8
    if n == "int8":
        return INT8
    m = _NAME.match(n)
    return Scheme(n, "int", int(m.group(1)), int(m.group(2))) if m else None


# The default candidates: W4A16 at every group size vLLM's kernels take, W8A16, FP8 dynamic,
# INT8 W8A8 and float; host.py drops the ones this host's vLLM does not run.
DEFAULT_TYPES = ("w4g128", "w4g64", "w4g32", "w8g128", "w8g64", "fp8", "int8", "float")
