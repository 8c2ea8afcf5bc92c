"""Importance-matrix collection speed: seconds per 1k calibration tokens, medians.

    .venv/bin/python bench/imatrix.py [MODEL_DIR] [--ctx 512] [--chunks 2] [--repeat 3]
                                      [--threads N] [--text FILE] [--no-llamacpp]
                                      [--whole-model]

MODEL_DIR defaults to the embedded SmolLM2-135M-Instruct checkpoint, the text to the shared
TinyStories fixture (else a repeated built-in paragraph). Each round is one ``collect_imatrix``
call: "forward" is the time from the first to the last decoder layer (the progress callback's
timestamps; each layer runs over every chunk), "call" adds model and tokenizer loading.
``--whole-model`` also runs the whole-model float32 collector kept as the tests' reference. For scale, the same chunks are also
evaluated by llama.cpp on an F16 GGUF of the model (the work llama-imatrix would do, without its
callback). These machines are shared and noisy: medians of ``--repeat`` rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from quantkit.text import read_text

FALLBACK_TEXT = (
    "Once upon a time there was a little girl named Lily. She loved to play outside in the sun "
    "with her dog Max. One day they found a big red ball in the park and played until dark. "
) * 400


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", nargs="?", help="HF model dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--ctx", type=int, default=512, help="tokens per chunk (default 512)")
    ap.add_argument("--chunks", type=int, default=2, help="chunks per round (default 2)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--text", type=Path, default=None)
    ap.add_argument("--no-llamacpp", action="store_true", help="skip the llama.cpp comparison")
    ap.add_argument(
        "--whole-model",
        action="store_true",
        help="also time the whole-model float32 collector (tests/imatrix_reference.py) and "
        "print the largest per-tensor relative difference",
    )
    args = ap.parse_args()

    from quantkit.quantize.gguf.imatrix import bos_added, chunk_tokens, collect_imatrix

    if args.model:
        model = Path(args.model)
    else:
        from quantkit.demo import demo_model

        model = demo_model()
    fixture = (
        Path(__file__).resolve().parents[2]
        / "shared/fixtures/tinystories/tinystories_train_head.txt"
    )
    text_path = args.text or (fixture if fixture.is_file() else None)
    text = read_text(text_path) if text_path else FALLBACK_TEXT
    threads = args.threads or len(os.sched_getaffinity(0))
    n_tok = args.ctx * args.chunks

    forward, call = [], []
    for _ in range(args.repeat):
        marks: dict[int, float] = {}
        t0 = time.perf_counter()
        im = collect_imatrix(
            model,
            text,
            ctx=args.ctx,
            chunks=args.chunks,
            threads=threads,
            progress=lambda _s, done, _n, marks=marks: marks.__setitem__(done, time.perf_counter()),
        )
        call.append(time.perf_counter() - t0)
        forward.append(marks[max(marks)] - marks[0])  # first to last layer
        if im.chunks != args.chunks:
            sys.exit(f"the text gives only {im.chunks} chunks of {args.ctx} tokens")

    print(f"model: {model}")
    print(f"text: {text_path or 'built-in paragraph'}; {args.chunks} chunks x {args.ctx} tokens")
    print(f"threads: {threads}; {args.repeat} rounds, medians; {len(im.entries)} imatrix entries")
    f, c = statistics.median(forward), statistics.median(call)
    print(f"torch forward+hooks : {f:7.2f} s  = {f / n_tok * 1000:6.2f} s per 1k tokens")
    print(f"whole call (+load)  : {c:7.2f} s  = {c / n_tok * 1000:6.2f} s per 1k tokens")

    if args.whole_model:
        import numpy as np

        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from imatrix_reference import collect_whole_model

        whole = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            ref = collect_whole_model(model, text, ctx=args.ctx, chunks=args.chunks)
            whole.append(time.perf_counter() - t0)
        worst = max(
            float(np.abs(s - ref.entries[n][0]).max() / np.abs(ref.entries[n][0]).max())
            for n, (s, _) in im.entries.items()
        )
        w = statistics.median(whole)
        print(f"whole model (float32): {w:7.2f} s; layer by layer / whole = {c / w:.2f}x")
        print(f"largest per-tensor relative difference: {worst:.3g}")
    if args.no_llamacpp:
        return
    from transformers import AutoTokenizer

    from quantkit.convert import convert
    from quantkit.validate.llamacpp import LlamaCppModel

    tok = AutoTokenizer.from_pretrained(model)
    bos = bos_added(tok)
    ids = tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
    ids = ids["input_ids"]
    chunks = chunk_tokens(([bos] if bos is not None else []) + ids, args.ctx, args.chunks, bos)
    with tempfile.TemporaryDirectory() as tmp:
        f16 = Path(tmp) / "f16.gguf"
        convert(model, ["gguf:F16"], f16)
        m = LlamaCppModel(f16, n_ctx=args.ctx, threads=threads)
        try:
            rounds = []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                for chunk in chunks:
                    m.logits(chunk)
                rounds.append(time.perf_counter() - t0)
        finally:
            m.close()
    ll = statistics.median(rounds)
    print(f"llama.cpp F16 eval  : {ll:7.2f} s  = {ll / n_tok * 1000:6.2f} s per 1k tokens")
    print(f"torch / llama.cpp   : {f / ll:.2f}x")


if __name__ == "__main__":
    main()
