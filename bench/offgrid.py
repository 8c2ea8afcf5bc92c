"""A float-like copy of the embedded default: every weight moved off its quantization grid.

    .venv/bin/python bench/offgrid.py OUT [--seed 0] [--spread uniform|triangular] [--src CKPT]

The embedded default (SmolLM2-135M-Instruct) is a dequantized Q4_1 GGUF: each 32-value block of
a linear layer's row holds only the 16 levels lo + d·q (lo the block's minimum, d = (max − lo)/15,
q = 0…15: llama.cpp's reference Q4_1), and the embedding holds Q8_0's levels d·q (d = absmax/127).
Types that reproduce that grid (Q4_1, Q5_1, Q8_0) are near-lossless on it, so rankings of types
and mixes measured on it are skewed. This writes the same model with each weight re-spread
within its own rounding cell, lo + d·(q + u) (u drawn from ``--spread`` over [−½, ½], seeded):
the same shapes, tokenizer and function to within half a step, but on no grid.

The grid is recovered from the weights themselves and checked (the mean distance of q to the
nearest integer must be below ``MAX_RESIDUAL`` for every re-spread tensor); tensors on no grid
(norms, 1-D) are copied. The checkpoint is written in float32 (F16 would round the re-spread
values back towards a 2^-11-relative grid of its own).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

# A tensor whose weights sit on the grid has residual ~1e-3 (F16 rounding of lo + d·q); one on
# no grid ~0.25 (uniform distance to the nearest integer).
MAX_RESIDUAL = 0.02
BLOCK = 32  # Q4_1 and Q8_0 block size (ggml-common.h: QK4_1, QK8_0)


def _noise(rng: np.random.Generator, shape: tuple[int, ...], spread: str) -> np.ndarray:
    if spread == "uniform":
        return rng.uniform(-0.5, 0.5, shape).astype(np.float32)
    return rng.triangular(-0.5, 0.0, 0.5, shape).astype(np.float32)  # mass near the level


def grid(w: np.ndarray) -> tuple[str, np.ndarray, np.ndarray, float] | None:
    """(kind, lo, d, residual) of the grid the 2-D ``w`` sits on, per block of BLOCK columns;
    None when neither Q4_1's nor Q8_0's fits."""
    if w.ndim != 2 or w.shape[1] % BLOCK:
        return None
    b = w.reshape(w.shape[0], -1, BLOCK)
    best = None
    lo = b.min(-1, keepdims=True)
    for kind, lo_, d in (
        ("q4_1", lo, (b.max(-1, keepdims=True) - lo) / 15),
        ("q8_0", np.zeros_like(lo), np.abs(b).max(-1, keepdims=True) / 127),
    ):
        q = (b - lo_) / np.where(d > 0, d, 1)
        r = float(np.abs(q - np.round(q)).mean())
        if best is None or r < best[3]:
            best = (kind, lo_, d, r)
    return best if best and best[3] < MAX_RESIDUAL else None


def respread(w: np.ndarray, rng: np.random.Generator, spread: str) -> tuple[np.ndarray, str]:
    g = grid(w)
    if g is None:
        return w, "copied"
    kind, lo, d, _ = g
    b = w.reshape(w.shape[0], -1, BLOCK)
    q = np.round((b - lo) / np.where(d > 0, d, 1))
    out = lo + d * (q + _noise(rng, b.shape, spread))
    return out.reshape(w.shape).astype(np.float32), kind


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--spread", choices=("uniform", "triangular"), default="uniform")
    ap.add_argument("--src", type=Path, help="checkpoint to re-spread (default: the embedded one)")
    a = ap.parse_args(argv)
    from safetensors.numpy import load_file, save_file

    if a.src is None:
        from quantkit.demo import demo_model

        a.src = demo_model()
    tensors = load_file(a.src / "model.safetensors")
    rng = np.random.default_rng(a.seed)
    out, kinds = {}, {}
    for name in sorted(tensors):
        out[name], kinds[name] = respread(tensors[name].astype(np.float32), rng, a.spread)
    tmp = a.out.with_name(a.out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(a.src, tmp, ignore=shutil.ignore_patterns("*.safetensors"))
    save_file(out, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = json.loads((tmp / "config.json").read_text())
    cfg["torch_dtype"] = cfg["dtype"] = "float32"
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    if a.out.exists():
        shutil.rmtree(a.out)
    tmp.rename(a.out)
    counts: dict[str, int] = {}
    for k in kinds.values():
        counts[k] = counts.get(k, 0) + 1
    print(f"{a.out}: {counts} (seed {a.seed}, {a.spread})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
