"""Quantization overhead: `quantkit convert F16.gguf --to gguf:TYPE` vs a bare
`llama_model_quantize` call on the same file, in the same run; plus imatrix collection speed.

    .venv/bin/python bench/quantize.py [--type Q4_K_M] [--repeat 3] [--imatrix-tokens 2048]

Uses the embedded SmolLM2-135M-Instruct. Both sides run in the same process, alternating, with
the same thread count; medians are printed (these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import ctypes
import statistics
import tempfile
import time
from pathlib import Path

from quantkit.text import read_text


def direct_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    from quantkit.quantize.gguf.libllama import llama_cpp

    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.nthread = threads
    params.ftype = ftype
    if lib.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) != 0:
        raise SystemExit("direct llama_model_quantize failed")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--imatrix-tokens", type=int, default=2048, help="0 skips the imatrix timing")
    args = ap.parse_args()

    from quantkit.convert import QuantSettings, convert
    from quantkit.demo import demo_model
    from quantkit.quantize.gguf.quantizer import QuantizeOptions
    from quantkit.quantize.gguf.types import gguf_type

    model = demo_model()
    qtype = gguf_type(args.type)
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        base = convert(model, ["gguf:F16"], t / "base-F16.gguf").artifacts[0].path
        ours, direct = [], []
        qs = QuantSettings(options=QuantizeOptions(threads=args.threads))
        for i in range(args.repeat):
            t0 = time.perf_counter()
            direct_quantize(base, t / f"direct-{i}.gguf", int(qtype.ftype), args.threads)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            convert(base, [f"gguf:{qtype.name}"], t / f"ours-{i}.gguf", quant=qs)
            ours.append(time.perf_counter() - t0)
            assert (t / f"ours-{i}.gguf").read_bytes() == (t / f"direct-{i}.gguf").read_bytes()
        o, d = statistics.median(ours), statistics.median(direct)
        print(
            f"model: {model} → {qtype.name}, {args.threads} threads, {args.repeat} rounds, medians"
        )
        print(f"direct llama_model_quantize : {d:7.3f} s")
        print(f"quantkit convert (+ audit)  : {o:7.3f} s   (identical bytes)")
        print(f"ratio quantkit/direct: {o / d:.3f}x")

    if args.imatrix_tokens:
        from quantkit.quantize.gguf.imatrix import collect_imatrix

        text = (
            Path(__file__).resolve().parents[2]
            / "shared/fixtures/tinystories/tinystories_train_head.txt"
        )
        if not text.is_file():
            print(f"imatrix timing skipped: {text} absent")
            return
        ctx = 512
        chunks = max(1, args.imatrix_tokens // ctx)
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            im = collect_imatrix(
                model, read_text(text), ctx=ctx, chunks=chunks, threads=args.threads
            )
            runs.append(time.perf_counter() - t0)
        sec = statistics.median(runs)
        print(
            f"imatrix: {im.chunks} chunks × {ctx} tokens in {sec:.2f} s (incl. model load) = "
            f"{sec / (im.chunks * ctx / 1000):.2f} s per 1k tokens"
        )


if __name__ == "__main__":
    main()
