"""ggml's tensor types as the installed llama.cpp knows them, read from libggml at run time.

The ``gguf`` Python package mirrors ggml's ``enum ggml_type``, but it trails the C library: a type
llama.cpp added since (Q2_0 in the pinned build) is written by llama.cpp's quantizer all the same.
So names, block sizes and block bytes come from libggml itself (``ggml_type_name``,
``ggml_blck_size``, ``ggml_type_size``, ggml/include/ggml.h), never from a copy of the enum.
Removed ids (Q4_2, Q4_0_4_4 …) have a block size of 0 there and are skipped.
"""

from __future__ import annotations

import ctypes
from functools import cache

from quantkit.errors import EngineError, InputError


@cache
def libggml() -> ctypes.CDLL:
    """llama-cpp-python's libggml, with the signatures of the type-table functions set."""
    try:
        from llama_cpp._ggml import libggml
    except ImportError as e:  # pragma: no cover - the install step provides it
        raise EngineError(f"libggml is not loadable ({e})", "run scripts/install.sh") from None
    libggml.ggml_type_name.restype = ctypes.c_char_p
    libggml.ggml_type_name.argtypes = [ctypes.c_int]
    libggml.ggml_blck_size.restype = ctypes.c_int64
    libggml.ggml_blck_size.argtypes = [ctypes.c_int]
    libggml.ggml_type_size.restype = ctypes.c_size_t
    libggml.ggml_type_size.argtypes = [ctypes.c_int]
    return libggml


@cache
def _table() -> dict[int, tuple[str, int, int]]:
    """id → (NAME, block size, block bytes) for every type this libggml has."""
    import llama_cpp

    lib = libggml()
    out: dict[int, tuple[str, int, int]] = {}
    for i in range(int(llama_cpp.GGML_TYPE_COUNT)):
        block = int(lib.ggml_blck_size(i))
        if block <= 0:  # a removed type
            continue
        out[i] = (
            (lib.ggml_type_name(i) or b"").decode().upper(),
            block,
            int(lib.ggml_type_size(i)),
        )
    return out


def known(type_id: int) -> bool:
    return type_id in _table()


def type_name(type_id: int) -> str:
    """``42`` → ``Q2_0`` (libggml's name, upper case, as gguf-py and llama-quantize spell them)."""
    return _table()[type_id][0]


def block_size(type_id: int) -> int:
    """Values per block (32 for Q4_0, 256 for K-quants, 64 for NVFP4 …)."""
    return _table()[type_id][1]


def block_bytes(type_id: int) -> int:
    return _table()[type_id][2]


def bits_per_weight(type_id: int) -> float:
    name, block, size = _table()[type_id]
    return size * 8 / block


@cache
def _ids() -> dict[str, int]:
    return {name: i for i, (name, _, _) in _table().items()}


def type_id(name: str) -> int:
    """``'q6_k'`` / ``'Q2_0'`` → the ggml type id; InputError naming the known types."""
    i = _ids().get(name.strip().upper())
    if i is None:
        known_names = ", ".join(n.lower() for n in _ids())
        raise InputError(f"unknown tensor type {name!r}", f"use one of: {known_names}")
    return i


def names() -> tuple[str, ...]:
    return tuple(_ids())
