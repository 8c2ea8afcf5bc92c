"""Quantization overhead: `quantkit convert F16.gguf --to gguf:TYPE` vs a bare
`llama_model_quantize` call on the same file, in the same run; plus imatrix collection speed.

    .venv/bin/python bench/quantize.py [MODEL] [--type Q4_K_M] [--repeat 3] [--out DIR]
                                       [--imatrix-tokens 2048] [--threads N]

MODEL: an HF checkpoint folder (converted once to the float type of its own precision, in the same
call as the first quantized file: ``convert MODEL --to gguf:BF16 --to gguf:TYPE`` for a BF16
checkpoint, whose quantize step is compared with a direct call on that float file too) or an
F16/BF16/F32 GGUF; default the embedded SmolLM2-135M-Instruct. Then, alternating,
``convert F16.gguf --to gguf:TYPE`` and a bare ``llama_model_quantize`` on the same file with the
same thread count; every quantized file is compared byte for byte with the direct one. Medians
of wall time and of CPU time (all threads of this process) are printed with the load average (these machines are shared and noisy). ``--out``: where the
files go (default: the temp dir); deleted at the end.
"""

from __future__ import annotations

import argparse
import ctypes
import filecmp
import os
import resource
import statistics
import tempfile
import time
from pathlib import Path

from quantkit.text import read_text


def cpu() -> float:
    """CPU seconds of this process, every thread (llama.cpp's workers included): unlike wall
    time, not stretched by other jobs on a shared machine."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


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
            # the float type of the checkpoint's own precision is what quantkit quantizes from
            # (a BF16 checkpoint: a BF16 base), so the direct call gets that same file
            from quantkit.checkpoint import Checkpoint

            with Checkpoint.open(model) as ck:
                ftype = ck.source_dtype
            c0 = cpu()
            res = convert(model, [f"gguf:{ftype}", f"gguf:{qtype.name}"], t, quant=qs)
            base = next(a.path for a in res.artifacts if a.type == ftype)
            first = next(a.path for a in res.artifacts if a.type == qtype.name)
            c1 = cpu()
            t0 = time.perf_counter()
            direct_quantize(base, t / "direct-first.gguf", int(qtype.ftype), args.threads)
            one_run = (ftype, res.timings["stream"], res.timings["quantize"],
                       time.perf_counter() - t0, c1 - c0, cpu() - c1)  # fmt: skip
            same_first = filecmp.cmp(first, t / "direct-first.gguf", shallow=False)
            first.unlink()
            (t / "direct-first.gguf").unlink()
        else:
            base = model
        ours, direct, ours_cpu, direct_cpu = [], [], [], []
        for _ in range(args.repeat):
            t0, c0 = time.perf_counter(), cpu()
            direct_quantize(base, t / "direct.gguf", int(qtype.ftype), args.threads)
            direct.append(time.perf_counter() - t0)
            direct_cpu.append(cpu() - c0)
            t0, c0 = time.perf_counter(), cpu()
            convert(base, [f"gguf:{qtype.name}"], t / "ours.gguf", quant=qs, force=True)
            ours.append(time.perf_counter() - t0)
            ours_cpu.append(cpu() - c0)
            assert filecmp.cmp(t / "ours.gguf", t / "direct.gguf", shallow=False)
            (t / "ours.gguf").unlink()
            (t / "direct.gguf").unlink()
            loads.append(" ".join(f"{x:.1f}" for x in os.getloadavg()))
        o, d = statistics.median(ours), statistics.median(direct)
        oc, dc = statistics.median(ours_cpu), statistics.median(direct_cpu)
        print(f"model: {model} → {qtype.name}, {args.threads} threads, {args.repeat} rounds, "
              f"medians; load average before/after each round: {' | '.join(loads)}")  # fmt: skip
        print(f"base: {base.name} ({base.stat().st_size / 1e9:.2f} GB)")
        print(f"direct llama_model_quantize : {d:8.3f} s wall, {dc:8.3f} s CPU")
        print(f"quantkit convert (+ audit)  : {o:8.3f} s wall, {oc:8.3f} s CPU (identical bytes)")
        print(f"ratio quantkit/direct: {o / d:.3f}x wall, {oc / dc:.3f}x CPU")
        print("per round (direct s, quantkit s): "
              + ", ".join(f"({a:.2f}, {b:.2f})" for a, b in zip(direct, ours, strict=True)))  # fmt: skip
        if one_run is not None:
            ftype, f_s, q_s, d_s, q_c, d_c = one_run
            print(f"from the checkpoint in one run (convert MODEL --to gguf:{ftype} --to gguf:{qtype.name}): "
                  f"{ftype} {f_s:.2f} s, {qtype.name} step {q_s:.2f} s; direct on that {ftype} "
                  f"{d_s:.2f} s (ratio {q_s / d_s:.3f}x wall; CPU of the whole convert {q_c:.1f} s, "
                  f"of the direct call {d_c:.1f} s; {'identical' if same_first else 'DIFFERENT'} bytes)")  # fmt: skip
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
