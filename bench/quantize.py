"""Quantization overhead: `quantkit convert F16.gguf --to gguf:TYPE` vs a bare
`llama_model_quantize` call on the same file, in the same run; plus imatrix collection speed.

    .venv/bin/python bench/quantize.py [MODEL] [--type Q4_K_M] [--repeat 3] [--out DIR]
                                       [--imatrix-tokens 2048] [--threads N]

MODEL: an HF checkpoint folder (converted to F16 once, in the same call as the first quantized
file: ``convert MODEL --to gguf:F16 --to gguf:TYPE``, whose quantize step is compared too) or an
F16/BF16/F32 GGUF; default the embedded SmolLM2-135M-Instruct. Then, alternating,
``convert F16.gguf --to gguf:TYPE`` and a bare ``llama_model_quantize`` on the same file with the
same thread count; every quantized file is compared byte for byte with the direct one. Medians
are printed with the load average (these machines are shared and noisy). ``--out``: where the
files go (default: the temp dir); deleted at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import os
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
    ap.add_argument("model", nargs="?", help="HF checkpoint folder or float GGUF")
    ap.add_argument("--type", default="Q4_K_M")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", help="folder for the files (default: the temp dir)")
    ap.add_argument("--imatrix-tokens", type=int, default=2048, help="0 skips the imatrix timing")
    args = ap.parse_args()

    from quantkit.convert import QuantSettings, convert
    from quantkit.demo import demo_model
    from quantkit.quantize.gguf.quantizer import QuantizeOptions
    from quantkit.quantize.gguf.types import gguf_type

    model = Path(args.model) if args.model else demo_model()
    qtype = gguf_type(args.type)
    qs = QuantSettings(options=QuantizeOptions(threads=args.threads))
    loads = [" ".join(f"{x:.1f}" for x in os.getloadavg())]
    with tempfile.TemporaryDirectory(dir=args.out, prefix="bench-quantize-") as tmp:
        t = Path(tmp)
        one_run = None
        if model.is_dir():
            res = convert(model, ["gguf:F16", f"gguf:{qtype.name}"], t, quant=qs)
            base = next(a.path for a in res.artifacts if a.type == "F16")
            first = next(a.path for a in res.artifacts if a.type == qtype.name)
            t0 = time.perf_counter()
            direct_quantize(base, t / "direct-first.gguf", int(qtype.ftype), args.threads)
            one_run = (res.timings["stream"], res.timings["quantize"], time.perf_counter() - t0)
            same_first = filecmp.cmp(first, t / "direct-first.gguf", shallow=False)
            first.unlink()
            (t / "direct-first.gguf").unlink()
        else:
            base = model
        ours, direct = [], []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            direct_quantize(base, t / "direct.gguf", int(qtype.ftype), args.threads)
            direct.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            convert(base, [f"gguf:{qtype.name}"], t / "ours.gguf", quant=qs, force=True)
            ours.append(time.perf_counter() - t0)
            assert filecmp.cmp(t / "ours.gguf", t / "direct.gguf", shallow=False)
            (t / "ours.gguf").unlink()
            (t / "direct.gguf").unlink()
            loads.append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
        o, d = statistics.median(ours), statistics.median(direct)
        print(f"model: {model} → {qtype.name}, {args.threads} threads, {args.repeat} rounds, "
              f"medians; load average before/after each round: {' | '.join(loads)}")  # fmt: skip
        print(f"base: {base.name} ({base.stat().st_size / 1e9:.2f} GB)")
        print(f"direct llama_model_quantize : {d:8.3f} s")
        print(f"quantkit convert (+ audit)  : {o:8.3f} s   (identical bytes)")
        print(f"ratio quantkit/direct: {o / d:.3f}x")
        print("per round (direct s, quantkit s): "
              + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in zip(direct, ours, strict=True)))  # fmt: skip
        if one_run is not None:
            f16_s, q_s, d_s = one_run
            print(f"from the checkpoint in one run (convert MODEL --to gguf:F16 --to gguf:{qtype.name}): "
                  f"F16 {f16_s:.2f} s, {qtype.name} step {q_s:.2f} s; direct on that F16 {d_s:.2f} s "
                  f"(ratio {q_s / d_s:.3f}x, {'identical' if same_first else 'DIFFERENT'} bytes)")  # fmt: skip
    if args.model:
        return  # the imatrix timing below is on the embedded default only

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
