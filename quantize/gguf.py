"""GGUF quantization in llama.cpp's own code (``llama_model_quantize`` via llama-cpp-python).

No quantizer is re-implemented here: every quantized type comes out of libllama, the same code as
llama.cpp's ``llama-quantize`` tool (DESIGN.md decision 2).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

from quantkit.errors import EngineError
from quantkit.llama import clear_log, llama_cpp, recent_log
from quantkit.quantize.types import GGUFType


def default_threads() -> int:
    return max(
        1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    )


def quantize_file(src: Path, dst: Path, qtype: GGUFType, *, threads: int | None = None) -> None:
    """Quantize the GGUF ``src`` (F32/F16/BF16) into ``dst`` as ``qtype``."""
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads or default_threads()
    params.ftype = int(qtype.ftype)
    clear_log()
    rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        why = "; ".join(recent_log(3, errors_only=True)) or f"return code {rc}"
        raise EngineError(f"llama.cpp could not quantize {src.name} to {qtype.name}: {why}")
