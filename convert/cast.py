"""Float row casts for conversion: llama.cpp's own SIMD converters where they agree with numpy.

numpy casts float32 → float16 one element at a time (about 3 ns an element on an AVX-512 Zen 4;
numpy 2.4 vectorises half casts only for AVX512-FP16 CPUs), which made the F16 conversion of a
BF16 checkpoint several times slower than copying its bytes. ggml, built with llama.cpp for this
CPU, exports row converters that use F16C / AVX-512 (``ggml_cpu_fp32_to_fp16``,
``ggml_cpu_bf16_to_fp32``, ``ggml_cpu_fp16_to_fp32`` in ggml-cpu; ``ggml_fp32_to_bf16_row_ref`` in
ggml-base, the scalar round-to-nearest-even one: the AVX512-BF16 variant flushes subnormals).

Each converter is used only after it has reproduced numpy's (or gguf-py's) result bit for bit on a
probe of every finite BF16 and F16 value and a spread of float32 bit patterns (subnormals
included), so the bytes written never depend on which path ran; without llama-cpp-python, or on a
build whose converter disagrees, the numpy expression runs instead.
"""

from __future__ import annotations

import ctypes
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantkit.casts import f32_to_bf16

Row = Callable[[np.ndarray, np.ndarray], None]  # (contiguous 1-D source, same-length output)


def _np_bf16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    np.left_shift(src, 16, out=out.view(np.uint32), dtype=np.uint32)


def _np_f16_to_f32(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, src.view(np.float16))


def _np_f32_to_f16(src: np.ndarray, out: np.ndarray) -> None:
    with np.errstate(over="ignore"):  # beyond ±65504 is refused or clamped before this
        np.copyto(out.view(np.float16), src, casting="unsafe")


def _np_f32_to_bf16(src: np.ndarray, out: np.ndarray) -> None:
    np.copyto(out, f32_to_bf16(src))  # round to nearest even, as ggml_compute_fp32_to_bf16


NUMPY: dict[str, Row] = {
    "bf16_to_f32": _np_bf16_to_f32,
    "f16_to_f32": _np_f16_to_f32,
    "f32_to_f16": _np_f32_to_f16,
    "f32_to_bf16": _np_f32_to_bf16,
}
# converter → (library, exported symbol, source dtype, output dtype)
GGML: dict[str, tuple[str, str, type, type]] = {
    "bf16_to_f32": ("ggml-cpu", "ggml_cpu_bf16_to_fp32", np.uint16, np.float32),
    "f16_to_f32": ("ggml-cpu", "ggml_cpu_fp16_to_fp32", np.uint16, np.float32),
    "f32_to_f16": ("ggml-cpu", "ggml_cpu_fp32_to_fp16", np.float32, np.uint16),
    "f32_to_bf16": ("ggml-base", "ggml_fp32_to_bf16_row_ref", np.float32, np.uint16),
}


def _ggml_row(fn: ctypes._CFuncPtr) -> Row:  # type: ignore[name-defined]
    def row(src: np.ndarray, out: np.ndarray) -> None:
        # ctypes releases the GIL for the call: another thread can write meanwhile
        fn(src.ctypes.data, out.ctypes.data, src.size)

    return row


def _probe() -> dict[str, np.ndarray]:
    """Inputs that cover each converter's cases: every finite 16-bit float, and 2^14 float32
    bit patterns of every exponent (subnormals, ties, values beyond the F16 range)."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    bf16 = every[(every & 0x7FFF) < 0x7F80]
    f16 = every[(every & 0x7FFF) < 0x7C00]
    # spread over all 32-bit patterns by Fibonacci hashing (numpy.random costs 0.1 s to import)
    i = np.arange(1 << 14, dtype=np.uint64)
    bits = ((i * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).astype(np.uint32)
    # F16 ties: the 13 dropped mantissa bits exactly 0x1000, and F16-subnormal magnitudes
    bits[: 1 << 11] = (bits[: 1 << 11] & 0xFFFFE000) | 0x1000
    sub = (96 + i[: 1 << 11] % 17).astype(np.uint32) << 23  # exponents 2^-31 … 2^-15
    bits[1 << 11 : 1 << 12] = (bits[1 << 11 : 1 << 12] & 0x807FFFFF) | sub
    f32 = bits[(bits & 0x7FFFFFFF) < 0x7F800000].view(np.float32)
    return {"bf16_to_f32": bf16, "f16_to_f32": f16, "f32_to_f16": f32, "f32_to_bf16": f32}


def _ggml_dir() -> Path | None:
    try:
        from quantkit.quantize.gguf.libllama import llama_cpp

        lib = llama_cpp()  # refuses a build made for another CPU
    except Exception:  # not installed or not loadable: numpy does the casts
        return None
    d = Path(lib.__file__).parent / "lib"
    return d if d.is_dir() else None


def _load(d: Path, name: str) -> ctypes.CDLL | None:
    suffix = {"win32": ".dll", "darwin": ".dylib"}.get(sys.platform, ".so")
    for cand in (d / f"lib{name}{suffix}", d / f"{name}{suffix}"):
        if cand.is_file():
            try:
                return ctypes.CDLL(str(cand))
            except OSError:
                return None
    return None


def _checked_rows() -> dict[str, Row]:
    rows = dict(NUMPY)
    d = _ggml_dir()
    if d is None:
        return rows
    libs: dict[str, ctypes.CDLL | None] = {}
    probe = _probe()
    for what, (libname, symbol, sdt, odt) in GGML.items():
        lib = libs.get(libname)
        if libname not in libs:
            lib = libs[libname] = _load(d, libname)
            # the scalar tail of ggml-cpu's F16 → F32 reads a table ggml_cpu_init fills
            # (idempotent; without it the last n % 16 elements come out as zeros)
            init = getattr(lib, "ggml_cpu_init", None) if libname == "ggml-cpu" else None
            if init is not None:
                init.argtypes, init.restype = [], None
                init()
        fn = getattr(lib, symbol, None) if lib is not None else None
        if fn is None:
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
        fn.restype = None
        candidate = _ggml_row(fn)
        if _agrees(candidate, NUMPY[what], np.ascontiguousarray(probe[what]).view(sdt), odt):
            rows[what] = candidate
    return rows


def _agrees(candidate: Row, reference: Row, src: np.ndarray, odt: type) -> bool:
    """Same output bytes on the whole probe, on an odd length from an odd offset (the SIMD
    loop's scalar tail and unaligned loads), and on a length shorter than one vector."""
    for part in (src, src[1:-2], src[3:10]):
        want, got = np.empty(part.size, odt), np.zeros(part.size, odt)
        reference(part, want)
        candidate(part, got)
        if not np.array_equal(want.view(np.uint8), got.view(np.uint8)):
            return False
    return True


_ROWS: dict[str, Row] | None = None


def rows() -> dict[str, Row]:
    """The row converters in use: ggml's where they matched numpy on the probe, else numpy's."""
    global _ROWS
    if _ROWS is None:
        _ROWS = _checked_rows()
    return _ROWS


def backends() -> dict[str, str]:
    """Which implementation runs each converter ("ggml" or "numpy"), for benchmarks."""
    return {k: "numpy" if v is NUMPY[k] else "ggml" for k, v in rows().items()}
