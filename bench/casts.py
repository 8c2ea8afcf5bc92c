"""F32 → BF16 in numpy: quantkit/casts.py against gguf-py's quantizer (the baseline, same bits).

    .venv/bin/python bench/casts.py [--floats 16777216] [--repeat 5]

Prints the median time of each over ``--repeat`` runs on the same random array and their ratio;
the bits are compared first (tests/test_casts.py checks them against torch too).
"""

from __future__ import annotations

import argparse
import time

import gguf
import numpy as np

from quantkit.casts import f32_to_bf16


def median_seconds(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[repeat // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--floats", type=int, default=1 << 24)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    x = np.random.default_rng(0).standard_normal(a.floats, dtype=np.float32)
    base = gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16).view(np.uint16)
    assert np.array_equal(f32_to_bf16(x), base), "different bits"
    t_base = median_seconds(
        lambda: gguf.quants.quantize(x, gguf.GGMLQuantizationType.BF16), a.repeat
    )
    t_ours = median_seconds(lambda: f32_to_bf16(x), a.repeat)
    print(f"{a.floats} floats, median of {a.repeat}: gguf.quants {t_base * 1e3:.0f} ms, "
          f"quantkit.casts {t_ours * 1e3:.0f} ms, {t_base / t_ours:.2f}x")  # fmt: skip


if __name__ == "__main__":
    main()
