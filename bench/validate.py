"""Scoring throughput of the validation harness vs a bare llama-cpp-python eval loop.

Same GGUF, same token ids, same chunks, same process, same threads:

- bare: ``Llama(logits_all=True, flash_attn=True)``; per chunk ``reset()``, ``eval(chunk)``, copy ``scores`` — what
  one would write by hand to get the logits of every chunk.
- ours: ``quantkit.validate.worker.run`` on an artifact job — the engine's scoring (only the scored
  half of each chunk gets logits, as llama-perplexity asks for them) plus every metric (log-softmax,
  exact KLD against the cached reference distribution, top-1, |Δp|, NLL).

Each side runs ``--repeat`` times alternately; the best time of each is compared. Target: ratio
ours/bare ≥ 0.9.

    .venv/bin/python bench/validate.py [GGUF] [--text FILE] [--ctx 512] [--chunks 4] [--threads N]

Without GGUF, the embedded default model is converted to Q8_0 (once, in a temporary folder).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from quantkit.text import read_text

FIXTURE_TEXT = Path(__file__).resolve().parents[2] / "shared/fixtures/wikitext-2-raw/wiki.test.raw"


def bare_loop(path: Path, chunks: np.ndarray, threads: int) -> float:
    from llama_cpp import Llama

    from quantkit.quantize.gguf.libllama import llama_cpp

    llama_cpp()
    n_ctx = chunks.shape[1]
    llm = Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        flash_attn=True,  # as the harness (and llama-perplexity) run it
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    try:
        t0 = time.perf_counter()
        for c in chunks:
            llm.reset()
            llm._ctx.kv_cache_clear()
            llm.eval(c.tolist())
            _ = np.array(llm.scores[:n_ctx], dtype=np.float32)
        return time.perf_counter() - t0
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("gguf", nargs="?", type=Path)
    ap.add_argument("--text", type=Path, default=FIXTURE_TEXT)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()

    from quantkit.validate import worker
    from quantkit.validate.quality import llama_tokens

    tmp = Path(tempfile.mkdtemp(prefix="quantkit-bench-validate-"))
    path = args.gguf
    if path is None:
        from quantkit.convert import convert
        from quantkit.demo import demo_model

        path = convert(demo_model(), ["Q8_0"], tmp / "m-Q8_0.gguf").artifacts[0].path
    text = read_text(args.text)[:400_000]
    from quantkit.validate.metrics import make_chunks

    ids, bos = llama_tokens(path, text, n_ctx=args.ctx)
    chunks = np.asarray(make_chunks(ids, args.ctx, args.chunks, bos), dtype=np.int32)
    np.save(tmp / "chunks.npy", chunks)
    base = {
        "chunks": str(tmp / "chunks.npy"),
        "first": args.ctx // 2,
        "threads": args.threads,
        "engine": "llama.cpp",
        "path": str(path),
        "pp": 0,
        "tg": 0,
        "dir": str(tmp),
    }
    # reference distribution for the KLD: the same file (the metric cost does not depend on it)
    (tmp / "ref").mkdir()
    worker.run({**base, "role": "reference", "ref_out": str(tmp / "ref")})
    job = {**base, "role": "artifact", "ref_logprobs": str(tmp / "ref" / "logprobs.npy")}

    n_tok = chunks.size
    bare_t, ours_t = [], []
    for _ in range(args.repeat):
        bare_t.append(bare_loop(path, chunks, args.threads))
        res = worker.run(job)
        ours_t.append(res["score_seconds"])
    bare, ours = n_tok / min(bare_t), n_tok / min(ours_t)
    print(f"model: {path.name}; {len(chunks)} chunks of {args.ctx} tokens; {args.threads} threads")
    print(f"bare llama-cpp-python eval loop : {bare:8.1f} tokens/s  (best of {args.repeat})")
    print(f"quantkit validate scoring       : {ours:8.1f} tokens/s  (metrics included)")
    print(f"ratio ours/bare                 : {ours / bare:8.3f}  (target ≥ 0.9)")


if __name__ == "__main__":
    main()
