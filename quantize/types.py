"""The GGUF file types quantkit can write, as data.

Names and ftypes are llama.cpp's (tools/quantize/quantize.cpp QUANT_OPTIONS, enum llama_ftype in
include/llama.h; gguf-py mirrors the enum as ``LlamaFileType``). ``bpw`` is the nominal bits per
weight of the main tensor type (block bytes × 8 / block size, ggml.c type traits); mixes put
some tensors in larger types, so files come out a little above it. ``imatrix``: llama.cpp refuses
the type without an importance matrix (src/llama-quant.cpp tensor_requires_imatrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from quantkit.errors import InputError

F = gguf.LlamaFileType


@dataclass(frozen=True)
class GGUFType:
    name: str
    ftype: gguf.LlamaFileType
    bpw: float
    imatrix: bool = False
    base: bool = False  # written directly by the converter (no llama.cpp quantizer pass)

    @property
    def quantized(self) -> bool:
        return not self.base


GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", F.ALL_F32, 32.0, base=True),
        GGUFType("F16", F.MOSTLY_F16, 16.0, base=True),
        GGUFType("BF16", F.MOSTLY_BF16, 16.0, base=True),
        GGUFType("Q8_0", F.MOSTLY_Q8_0, 8.5),
        GGUFType("Q6_K", F.MOSTLY_Q6_K, 6.5625),
        GGUFType("Q5_1", F.MOSTLY_Q5_1, 6.0),
        GGUFType("Q5_0", F.MOSTLY_Q5_0, 5.5),
        GGUFType("Q5_K_M", F.MOSTLY_Q5_K_M, 5.5),
        GGUFType("Q5_K_S", F.MOSTLY_Q5_K_S, 5.5),
        GGUFType("Q4_1", F.MOSTLY_Q4_1, 5.0),
        GGUFType("Q4_0", F.MOSTLY_Q4_0, 4.5),
        GGUFType("Q4_K_M", F.MOSTLY_Q4_K_M, 4.5),
        GGUFType("Q4_K_S", F.MOSTLY_Q4_K_S, 4.5),
        GGUFType("IQ4_NL", F.MOSTLY_IQ4_NL, 4.5),
        GGUFType("IQ4_XS", F.MOSTLY_IQ4_XS, 4.25),
        GGUFType("Q3_K_L", F.MOSTLY_Q3_K_L, 3.4375),
        GGUFType("Q3_K_M", F.MOSTLY_Q3_K_M, 3.4375),
        GGUFType("Q3_K_S", F.MOSTLY_Q3_K_S, 3.4375),
        GGUFType("IQ3_M", F.MOSTLY_IQ3_M, 3.4375),
        GGUFType("IQ3_S", F.MOSTLY_IQ3_S, 3.4375),
        GGUFType("IQ3_XS", F.MOSTLY_IQ3_XS, 3.4375),
        GGUFType("IQ3_XXS", F.MOSTLY_IQ3_XXS, 3.0625, imatrix=True),
        GGUFType("Q2_K", F.MOSTLY_Q2_K, 2.625),
        GGUFType("Q2_K_S", F.MOSTLY_Q2_K_S, 2.625, imatrix=True),
        GGUFType("IQ2_M", F.MOSTLY_IQ2_M, 2.5, imatrix=True),
        GGUFType("IQ2_S", F.MOSTLY_IQ2_S, 2.5, imatrix=True),
        GGUFType("IQ2_XS", F.MOSTLY_IQ2_XS, 2.3125, imatrix=True),
        GGUFType("IQ2_XXS", F.MOSTLY_IQ2_XXS, 2.0625, imatrix=True),
        GGUFType("TQ2_0", F.MOSTLY_TQ2_0, 2.0625),
        GGUFType("IQ1_M", F.MOSTLY_IQ1_M, 1.75, imatrix=True),
        GGUFType("TQ1_0", F.MOSTLY_TQ1_0, 1.6875),
        GGUFType("IQ1_S", F.MOSTLY_IQ1_S, 1.5625, imatrix=True),
    )
}


def gguf_type(name: str) -> GGUFType:
    t = GGUF_TYPES.get(name.upper())
    if t is None:
        raise InputError(f"unknown GGUF type {name!r}", f"choose one of: {', '.join(GGUF_TYPES)}")
    return t
