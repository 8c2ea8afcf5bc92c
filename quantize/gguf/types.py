"""The GGUF file types quantkit can write, as data.

Names and ftypes are llama.cpp's (tools/quantize/quantize.cpp QUANT_OPTIONS, enum llama_ftype in
include/llama.h; gguf-py mirrors the enum as ``LlamaFileType``). ``bpw`` is the nominal bits per
weight of the main tensor type (block bytes × 8 / block size, ggml.c type traits); mixes put
some tensors in larger types, so files come out a little above it. ``imatrix``: llama.cpp refuses
the type without an importance matrix (src/llama-quant.cpp tensor_requires_imatrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import gguf

from quantkit.errors import InputError

F = gguf.LlamaFileType


Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GGUFType:
    name: str
    ftype: gguf.LlamaFileType
    main: gguf.GGMLQuantizationType  # the type most weights get (llama-quant.cpp default_type)
    imatrix: bool = False
    base: bool = False  # written directly by the converter (no llama.cpp quantizer pass)

    @property
    def quantized(self) -> bool:
        return not self.base

    @property
    def bpw(self) -> float:
        """Nominal bits per weight of the main type: block bytes × 8 / block size."""
        block, size = gguf.GGML_QUANT_SIZES[self.main]
        return size * 8 / block

    @property
    def block(self) -> int:
        return gguf.GGML_QUANT_SIZES[self.main][0]


# Order: largest to smallest, as `quantkit types` lists them.
GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", F.ALL_F32, Q.F32, base=True),
        GGUFType("F16", F.MOSTLY_F16, Q.F16, base=True),
        GGUFType("BF16", F.MOSTLY_BF16, Q.BF16, base=True),
        GGUFType("Q8_0", F.MOSTLY_Q8_0, Q.Q8_0),
        GGUFType("Q6_K", F.MOSTLY_Q6_K, Q.Q6_K),
        GGUFType("Q5_1", F.MOSTLY_Q5_1, Q.Q5_1),
        GGUFType("Q5_K_M", F.MOSTLY_Q5_K_M, Q.Q5_K),
        GGUFType("Q5_K_S", F.MOSTLY_Q5_K_S, Q.Q5_K),
        GGUFType("Q5_0", F.MOSTLY_Q5_0, Q.Q5_0),
        GGUFType("Q4_1", F.MOSTLY_Q4_1, Q.Q4_1),
        GGUFType("Q4_K_M", F.MOSTLY_Q4_K_M, Q.Q4_K),
        GGUFType("Q4_K_S", F.MOSTLY_Q4_K_S, Q.Q4_K),
        GGUFType("Q4_0", F.MOSTLY_Q4_0, Q.Q4_0),
        GGUFType("IQ4_NL", F.MOSTLY_IQ4_NL, Q.IQ4_NL),
        GGUFType("IQ4_XS", F.MOSTLY_IQ4_XS, Q.IQ4_XS),
        GGUFType("Q3_K_L", F.MOSTLY_Q3_K_L, Q.Q3_K),
        GGUFType("Q3_K_M", F.MOSTLY_Q3_K_M, Q.Q3_K),
        GGUFType("Q3_K_S", F.MOSTLY_Q3_K_S, Q.Q3_K),
        GGUFType("IQ3_M", F.MOSTLY_IQ3_M, Q.IQ3_S),
        GGUFType("IQ3_S", F.MOSTLY_IQ3_S, Q.IQ3_S),
        GGUFType("IQ3_XS", F.MOSTLY_IQ3_XS, Q.IQ3_S),
        GGUFType("IQ3_XXS", F.MOSTLY_IQ3_XXS, Q.IQ3_XXS, imatrix=True),
        GGUFType("Q2_K", F.MOSTLY_Q2_K, Q.Q2_K),
        GGUFType("Q2_K_S", F.MOSTLY_Q2_K_S, Q.Q2_K, imatrix=True),
        GGUFType("IQ2_M", F.MOSTLY_IQ2_M, Q.IQ2_S, imatrix=True),
        GGUFType("IQ2_S", F.MOSTLY_IQ2_S, Q.IQ2_XS, imatrix=True),
        GGUFType("IQ2_XS", F.MOSTLY_IQ2_XS, Q.IQ2_XS, imatrix=True),
        GGUFType("IQ2_XXS", F.MOSTLY_IQ2_XXS, Q.IQ2_XXS, imatrix=True),
        GGUFType("TQ2_0", F.MOSTLY_TQ2_0, Q.TQ2_0),
        GGUFType("IQ1_M", F.MOSTLY_IQ1_M, Q.IQ1_M, imatrix=True),
        GGUFType("TQ1_0", F.MOSTLY_TQ1_0, Q.TQ1_0),
        GGUFType("IQ1_S", F.MOSTLY_IQ1_S, Q.IQ1_S, imatrix=True),
    )
}
BY_FTYPE: dict[int, GGUFType] = {int(t.ftype): t for t in GGUF_TYPES.values()}


def gguf_type(name: str) -> GGUFType:
    t = GGUF_TYPES.get(name.upper())
    if t is None:
        raise InputError(f"unknown GGUF type {name!r}", f"choose one of: {', '.join(GGUF_TYPES)}")
    return t


def base_type(source_dtype: str, floats: Sequence[str] = ()) -> str:
    """The float type every quantized type (and gguf:auto) is made from, for weights stored in
    ``source_dtype``: a requested float type that holds them exactly (the same precision, or
    F32), else the checkpoint's own precision (F16 or BF16; F32 for anything wider). Never a
    narrower range than the weights': a BF16 weight of 1e5 has no F16 value (±65504), so a
    fixed F16 base would refuse a checkpoint that converts to every type."""
    own = source_dtype if source_dtype in ("F16", "BF16") else "F32"
    return next((f for f in floats if f in (own, "F32")), own)
