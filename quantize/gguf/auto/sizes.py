"""Exact byte sizes of a GGUF as ``llama_model_quantize`` will write it, tensor by tensor.

What llama.cpp does (src/llama-quant.cpp of the pinned version, ``llama_model_quantize_impl``):

- a tensor is quantized only if ``tensor_allows_quantization`` says so (2-D/3-D, name ending in
  ``weight``, not a norm, not ``ffn_gate_inp`` …); every other tensor is copied as it is;
- a tensor of ``nrows`` rows of ``ne0`` values in type T takes ``nrows · ggml_row_size(T, ne0)``
  bytes, and is followed by zeros up to the file's alignment (``GGML_PAD(new_size, align)``);
- a type whose block does not divide ``ne0`` is replaced (``tensor_type_fallback``): candidate
  types here are only those whose block divides the row, so the plan is what gets written;
- the metadata is the input's key/values plus ``general.quantization_version``,
  ``general.file_type`` and the ``quantize.imatrix.*`` overrides, then the tensor infos, padded to
  the alignment (``gguf_get_meta_size``). The type of a tensor does not change its info's size,
  so the metadata's size is computed once with libggml's own gguf code.

No rule in llama-quant.cpp ties the types of two tensors together (attn_q/attn_k, gate/up are
typed one by one; a MoE layer's experts are one 3-D tensor, so one type), so each quantizable
tensor is its own group.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import gguf

from quantkit.errors import InputError
from quantkit.quantize.gguf import ggml
from quantkit.quantize.gguf.auto.rows import _lib, row_size
from quantkit.quantize.gguf.quantizer import KV_INT, KV_STR

# Candidate tensor types, best first. Not offered unless named in types=: BF16/F32 (never smaller
# than F16 for a weight that fits F16's range: the base was written in it), TQ1_0/TQ2_0/Q2_0/Q1_0
# (ternary / binary: only for models trained so), MXFP4 and NVFP4 (FP4 with a shared scale per
# 32 / per 16 values: llama.cpp writes them for MXFP4 MoE experts and NVFP4 checkpoints; named in
# types= they compete like any other type, e.g. types=NVFP4,Q8_0).
DEFAULT_TYPES: tuple[str, ...] = (
    "F16", "Q8_0", "Q6_K", "Q5_K", "Q5_1", "Q5_0", "Q4_K", "Q4_1", "IQ4_NL", "IQ4_XS", "Q4_0",
    "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S",
)  # fmt: skip
# Types that need importance data: llama.cpp refuses them without it (tensor_requires_imatrix),
# or ggml asserts on it (ggml_quantize_requires_imatrix). Q2_K needs it only in Q2_K_S files;
# here it is always quantized with the imatrix when the tensor has one.
NEEDS_IMATRIX = {"IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"}
GGML_QNT_VERSION = 2  # ggml/include/ggml.h


@dataclass
class Slot:
    """One tensor of the base file and what it may become."""

    name: str
    shape: tuple[int, ...]  # ggml order: ne0 (row length) first
    base_type: str
    base_bytes: int
    quantizable: bool
    has_imatrix: bool = False
    options: dict[str, int] = field(default_factory=dict)  # candidate type -> exact bytes

    @property
    def ncols(self) -> int:
        return self.shape[0]

    @property
    def nrows(self) -> int:
        n = 1
        for d in self.shape[1:]:
            n *= d
        return n

    @property
    def n_elements(self) -> int:
        return self.ncols * self.nrows

    @property
    def kind(self) -> str:
        """``attn_q``, ``ffn_down``, ``token_embd`` …: the name without layer and suffix."""
        parts = self.name.split(".")
        core = parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]
        return core

    @property
    def layer(self) -> int | None:
        """The block index of ``blk.N.…`` (None: token_embd, output …)."""
        parts = self.name.split(".")
        return (
            int(parts[1]) if parts[0] == "blk" and len(parts) > 2 and parts[1].isdigit() else None
        )


def allows_quantization(name: str, n_dims: int) -> bool:
    """llama-quant.cpp ``tensor_allows_quantization`` for the tensors of the architectures
    quantkit writes (the multimodal / RWKV / Mamba name rules do not occur in them)."""
    if n_dims < 2 or not name.endswith("weight") or "_norm.weight" in name:
        return False
    skip = ("ffn_gate_inp.weight", "altup", "laurel", "per_layer_model_proj", "ssm_conv1d",
            "shortconv.conv.weight", "attn_rel_b.weight", "position_embd", "token_types")  # fmt: skip
    return not any(s in name for s in skip)


def candidates(ncols: int, types: Sequence[str], has_imatrix: bool) -> list[str]:
    """The types among ``types`` a row of ``ncols`` can take without a fallback."""
    out = []
    for t in types:
        block = ggml.block_size(ggml.type_id(t))
        if ncols % block:
            continue
        if t in NEEDS_IMATRIX and not has_imatrix:
            continue  # token_embd / output: llama.cpp collects no importance for them
        out.append(t)
    return out


def tensor_bytes(t: str, ncols: int, nrows: int) -> int:
    return nrows * row_size(ggml.type_id(t), ncols)


def slots(base: Path, imatrix_names: set[str], types: Sequence[str] | None = None) -> list[Slot]:
    """Every tensor of the float ``base`` GGUF with its candidate types and their exact bytes."""
    reader = gguf.GGUFReader(base)
    want = tuple(types) if types else DEFAULT_TYPES
    out = []
    for t in reader.tensors:
        shape = tuple(int(x) for x in t.shape)
        s = Slot(t.name, shape, t.tensor_type.name, int(t.n_bytes),
                 allows_quantization(t.name, len(shape)), t.name in imatrix_names)  # fmt: skip
        if s.quantizable:
            s.options = {
                c: tensor_bytes(c, s.ncols, s.nrows)
                for c in candidates(s.ncols, want, s.has_imatrix)
            }
        out.append(s)
    return out


class _InitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.c_void_p)]


def metadata_bytes(base: Path, ftype: int, kvs: Sequence[tuple[str, int, str | int]]) -> int:
    """Bytes before the first tensor in the file llama_model_quantize writes from ``base`` with
    these ``quantize.imatrix.*`` overrides (gguf_get_meta_size of the same key/values)."""
    lib = _lib()
    lib.gguf_init_from_file.restype = ctypes.c_void_p
    lib.gguf_init_from_file.argtypes = [ctypes.c_char_p, _InitParams]
    lib.gguf_get_meta_size.restype = ctypes.c_size_t
    lib.gguf_get_meta_size.argtypes = [ctypes.c_void_p]
    lib.gguf_set_val_u32.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]
    lib.gguf_set_val_str.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]
    lib.gguf_free.argtypes = [ctypes.c_void_p]
    ctx = lib.gguf_init_from_file(str(base).encode(), _InitParams(True, None))
    if not ctx:
        raise InputError(f"{base}: libggml cannot read this GGUF")
    try:
        lib.gguf_set_val_u32(ctx, b"general.quantization_version", GGML_QNT_VERSION)
        lib.gguf_set_val_u32(ctx, b"general.file_type", ftype)
        for key, tag, val in kvs:
            if tag == KV_STR:  # llama_model_kv_override.val_str is char[128]: strncpy(…, 127)
                lib.gguf_set_val_str(ctx, key.encode(), str(val).encode("utf-8")[:127])
            elif tag == KV_INT:  # written as UINT32 (llama-quant.cpp)
                lib.gguf_set_val_u32(ctx, key.encode(), abs(int(val)) & 0xFFFFFFFF)
        return int(lib.gguf_get_meta_size(ctx))
    finally:
        lib.gguf_free(ctx)


def alignment(base: Path) -> int:
    reader = gguf.GGUFReader(base)
    return int(reader.alignment)


def padded(n: int, align: int) -> int:
    return -(-n // align) * align
