"""CPU-derived CMake flags for building llama.cpp (through llama-cpp-python).

Runs standalone (``python quantkit/buildflags.py``) before quantkit is installed, so it imports
nothing outside the standard library and ``host.py`` beside it (the CPU's flags).

Why not the default build: llama.cpp's native build (``GGML_NATIVE=ON``) crashes on quantized
GGUFs on the Intel Xeons we run on (they advertise AMX and llama.cpp's AMX path dies), and a build
with AVX-512 forced on dies with "Illegal instruction" on AMD EPYCs without it (measured
2026-11-24, docs/decisions.md). So every ISA switch is set from the CPU's own flags and AMX is
always off.
"""

from __future__ import annotations

import hashlib
import sys

try:
    from quantkit.host import cpu_flags
except ImportError:  # run by path before quantkit is installed: host.py is in this folder
    from host import cpu_flags  # type: ignore[no-redef]

# GGML CMake option -> /proc/cpuinfo flag that must be present to switch it on
# (option names from ggml/CMakeLists.txt of llama.cpp as vendored by llama-cpp-python 0.3.36).
ISA_FLAGS: dict[str, str] = {
    "GGML_AVX": "avx",
    "GGML_AVX2": "avx2",
    "GGML_FMA": "fma",
    "GGML_F16C": "f16c",
    "GGML_BMI2": "bmi2",
    "GGML_AVX512": "avx512f",
    "GGML_AVX512_VBMI": "avx512vbmi",
    "GGML_AVX512_VNNI": "avx512_vnni",
    "GGML_AVX512_BF16": "avx512_bf16",
}
ALWAYS: dict[str, str] = {
    "GGML_NATIVE": "OFF",
    "GGML_AMX_TILE": "OFF",
    "GGML_AMX_INT8": "OFF",
    "GGML_AMX_BF16": "OFF",
    "LLAVA_BUILD": "OFF",  # the multimodal library quantkit does not use
    "LLAMA_BUILD_TESTS": "OFF",
    "LLAMA_BUILD_EXAMPLES": "OFF",
}


def cmake_options(flags: set[str]) -> dict[str, str]:
    opts = dict(ALWAYS)
    for option, flag in ISA_FLAGS.items():
        opts[option] = "ON" if flag in flags else "OFF"
    return opts


def cmake_args(flags: set[str] | None = None) -> str:
    opts = cmake_options(cpu_flags() if flags is None else flags)
    return " ".join(f"-D{k}={v}" for k, v in sorted(opts.items()))


def flags_key(flags: set[str] | None = None) -> str:
    """Short hash of the CMake arguments: the key for a wheel cache that pip's own ignores."""
    return hashlib.sha256(cmake_args(flags).encode()).hexdigest()[:12]


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "args"
    print(flags_key() if what == "key" else cmake_args())
