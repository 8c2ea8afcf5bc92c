"""The GGUF file types quantkit can write, as data: every file type of the installed llama.cpp.

Names and ftypes are llama.cpp's (tools/quantize/quantize.cpp QUANT_OPTIONS, enum llama_ftype in
include/llama.h). Tensor types are named as libggml names them and their sizes come from libggml
at run time (quantize/gguf/ggml.py): the ``gguf`` package trails llama.cpp (gguf 0.19 has no Q2_0
and no MOSTLY_Q2_0), and a type it does not know is still written by llama.cpp. ``bpw`` is the
nominal bits per weight of the main tensor type (block bytes × 8 / block size); mixes put some
tensors in larger types, so files come out a little above it. ``imatrix``: llama.cpp refuses the
type without an importance matrix (src/llama-quant.cpp tensor_requires_imatrix).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantkit.errors import InputError


@dataclass(frozen=True)
class GGUFType:
    name: str
    ftype: int  # enum llama_ftype (include/llama.h)
    main: str  # the ggml type most weights get (llama-quant.cpp default_type), libggml's name
    imatrix: bool = False
    base: bool = False  # written directly by the converter (no llama.cpp quantizer pass)
    # llama_model_quantize refuses some ftypes as a whole-file target ("invalid output file
    # type": NVFP4 in the pinned llama.cpp, which writes NVFP4 files only from NVFP4 checkpoints
    # in its converter) but quantizes the tensor type per tensor. ``via``: the file type asked
    # for instead, with every layer weight overridden to ``main`` and general.file_type set to
    # ``ftype`` (the tensors outside the layers, token_embd and output, keep ``via``'s choice).
    via: str | None = None
    # Binary / ternary weights: meant for models trained in them (BitNet b1.58-style ternary, 1-bit
    # models). A float model loses most of its quality in them (docs/formats.md gives the KLD
    # measured on the embedded default); quantkit warns when the weights are not already so.
    # The value is the number of levels per block (2: binary, 3: ternary).
    trained_levels: int | None = None
    # ``main`` goes to the MoE expert tensors only; llama.cpp puts the rest in Q8_0
    # (llama-quant.cpp: MXFP4_MOE's default type is Q8_0, experts get MXFP4). On a dense model
    # such a file is a Q8_0 file.
    experts_only: bool = False

    @property
    def quantized(self) -> bool:
        return not self.base

    @property
    def main_id(self) -> int:
        from quantkit.quantize.gguf import ggml

        return ggml.type_id(self.main)

    @property
    def bpw(self) -> float:
        """Nominal bits per weight of the main type: block bytes × 8 / block size."""
        from quantkit.quantize.gguf import ggml

        return ggml.bits_per_weight(self.main_id)

    @property
    def block(self) -> int:
        from quantkit.quantize.gguf import ggml

        return ggml.block_size(self.main_id)


# Order: largest to smallest, as `quantkit types` lists them.
GGUF_TYPES: dict[str, GGUFType] = {
    t.name: t
    for t in (
        GGUFType("F32", 0, "F32", base=True),
        GGUFType("F16", 1, "F16", base=True),
        GGUFType("BF16", 32, "BF16", base=True),
        GGUFType("Q8_0", 7, "Q8_0"),
        GGUFType("Q6_K", 18, "Q6_K"),
        GGUFType("Q5_1", 9, "Q5_1"),
        GGUFType("Q5_K_M", 17, "Q5_K"),
        GGUFType("Q5_K_S", 16, "Q5_K"),
        GGUFType("Q5_0", 8, "Q5_0"),
        GGUFType("Q4_1", 3, "Q4_1"),
        GGUFType("Q4_K_M", 15, "Q4_K"),
        GGUFType("Q4_K_S", 14, "Q4_K"),
        GGUFType("Q4_0", 2, "Q4_0"),
        GGUFType("IQ4_NL", 25, "IQ4_NL"),
        GGUFType("NVFP4", 39, "NVFP4", via="Q8_0"),
        GGUFType("IQ4_XS", 30, "IQ4_XS"),
        GGUFType("MXFP4_MOE", 38, "MXFP4", experts_only=True),
        GGUFType("Q3_K_L", 13, "Q3_K"),
        GGUFType("Q3_K_M", 12, "Q3_K"),
        GGUFType("Q3_K_S", 11, "Q3_K"),
        GGUFType("IQ3_M", 27, "IQ3_S"),
        GGUFType("IQ3_S", 26, "IQ3_S"),
        GGUFType("IQ3_XS", 22, "IQ3_S"),
        GGUFType("IQ3_XXS", 23, "IQ3_XXS", imatrix=True),
        GGUFType("Q2_K", 10, "Q2_K"),
        GGUFType("Q2_K_S", 21, "Q2_K", imatrix=True),
        GGUFType("IQ2_M", 29, "IQ2_S", imatrix=True),
        GGUFType("IQ2_S", 28, "IQ2_XS", imatrix=True),
        GGUFType("IQ2_XS", 20, "IQ2_XS", imatrix=True),
        GGUFType("Q2_0", 41, "Q2_0", trained_levels=3),
        GGUFType("IQ2_XXS", 19, "IQ2_XXS", imatrix=True),
        GGUFType("TQ2_0", 37, "TQ2_0", trained_levels=3),
        GGUFType("IQ1_M", 31, "IQ1_M", imatrix=True),
        GGUFType("TQ1_0", 36, "TQ1_0", trained_levels=3),
        GGUFType("IQ1_S", 24, "IQ1_S", imatrix=True),
        GGUFType("Q1_0", 40, "Q1_0", trained_levels=2),
    )
}
# What the binary / ternary types cost a float model, measured in llama.cpp against the F16 file
# (docs/formats.md has the table): the embedded default (SmolLM2-135M-Instruct), wikitext-2
# test, 8 chunks of 256 tokens, second halves scored. Its 576-wide rows do not take Q1_0 (no
# fallback type for it in llama.cpp), so Q1_0's figure is from a random tiny Llama.
_SMOL = "on SmolLM2-135M vs its F16 GGUF, where Q4_K_M measured 0.057"
TRAINED_ONLY_KLD = {
    "TQ2_0": f"mean KLD 11.4, top-1 agreement 3.7 % {_SMOL}",
    "TQ1_0": f"mean KLD 11.4, top-1 agreement 3.7 % {_SMOL}",
    "Q2_0": f"mean KLD 12.9, top-1 agreement 0.1 % {_SMOL}",
    "Q1_0": "mean KLD 2.5, top-1 agreement 0 % on a random tiny Llama, where Q4_0 measured 0.44",
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
