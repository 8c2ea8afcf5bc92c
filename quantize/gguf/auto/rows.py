"""Quantize and dequantize rows with llama.cpp's own code (libggml inside llama-cpp-python).

``ggml_quantize_chunk`` is the function ``llama_model_quantize`` calls for every tensor
(src/llama-quant.cpp ``llama_tensor_quantize_impl``), with the same per-column importance, so the
bytes made here are the bytes the file would hold; ``to_float`` of the type traits
(``ggml_get_type_traits``, ggml/include/ggml.h) is the dequantization the engine uses, and
``ggml_row_size`` the exact byte count of a row.
"""

from __future__ import annotations

import ctypes
from functools import cache

import numpy as np

from quantkit.errors import EngineError
from quantkit.quantize.gguf import ggml

_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


class _Traits(ctypes.Structure):
    # struct ggml_type_traits (ggml/include/ggml.h of the pinned llama.cpp)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


@cache
def _lib() -> ctypes.CDLL:
    libggml = ggml.libggml()
    libggml.ggml_quantize_chunk.restype = ctypes.c_size_t
    libggml.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]  # fmt: skip
    libggml.ggml_row_size.restype = ctypes.c_size_t
    libggml.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    libggml.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    libggml.ggml_get_type_traits.argtypes = [ctypes.c_int]
    libggml.ggml_quantize_init.argtypes = [ctypes.c_int]
    return libggml


def row_size(ggml_type: int, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` values in ``ggml_type`` (ggml_row_size)."""
    return int(_lib().ggml_row_size(ggml_type, n_per_row))


@cache
def _to_float(ggml_type: int) -> ctypes._CFuncPtr:
    tr = _lib().ggml_get_type_traits(ggml_type).contents
    if not tr.to_float:
        raise EngineError(f"ggml type {ggml_type} has no dequantization")
    return _TO_FLOAT(tr.to_float)


def init(ggml_type: int) -> None:
    """Build the type's lookup tables once, before threads share them (IQ2/IQ3/IQ1 grids):
    ggml_quantize_chunk calls it too, but initialising from several threads at once races."""
    _lib().ggml_quantize_init(ggml_type)


def roundtrip(ggml_type: int, rows: np.ndarray, importance: np.ndarray | None) -> np.ndarray:
    """``rows`` (n × k float32) quantized with llama.cpp's quantizer and dequantized back.

    ``importance``: the k per-column weights llama.cpp's quantizer gets from the imatrix
    (None: uniform, as for tensors the matrix does not cover). Releases the GIL (ctypes), so
    tensors can be processed on several threads."""
    lib = _lib()
    x = np.ascontiguousarray(rows, dtype=np.float32)
    n, k = x.shape
    rs = row_size(ggml_type, k)
    buf = np.empty(n * rs, dtype=np.uint8)
    imp = None if importance is None else np.ascontiguousarray(importance, dtype=np.float32)
    got = lib.ggml_quantize_chunk(
        ggml_type, x.ctypes.data, buf.ctypes.data, 0, n, k,
        None if imp is None else imp.ctypes.data,
    )  # fmt: skip
    if got != n * rs:
        raise EngineError(f"ggml_quantize_chunk wrote {got} bytes, expected {n * rs}")
    out = np.empty((n, k), dtype=np.float32)
    _to_float(ggml_type)(buf.ctypes.data, out.ctypes.data, n * k)
    return out
