"""Perplexity and KL divergence of GGUF files in llama.cpp, the llama-perplexity way.

In-process building block (the validation harness runs engines in subprocesses): score one or
more GGUF files on the same token ids, chunked as llama-perplexity chunks them, with KLD against
a reference file's full distribution at every scored position.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from quantkit.validate.llamacpp import LlamaCppModel
from quantkit.validate.metrics import Accumulator, log_softmax, make_chunks


def llama_tokens(path: str | Path, text: str, *, n_ctx: int = 512) -> tuple[list[int], int | None]:
    """Tokenize as llama-perplexity does (the file's own vocabulary, BOS if it adds one)."""
    m = LlamaCppModel(path, n_ctx=n_ctx, threads=1)
    try:
        add_bos = (
            bool(m.llm._model.add_bos_token()) if hasattr(m.llm._model, "add_bos_token") else True
        )
        bos = m.llm.token_bos() if add_bos else None
        return m.tokenize(text, add_bos=add_bos, special=False), bos
    finally:
        m.close()


def score_files(
    paths: Sequence[str | Path],
    tokens: list[int],
    *,
    n_ctx: int = 512,
    n_chunks: int | None = None,
    bos: int | None = None,
    reference: str | Path | None = None,
    threads: int | None = None,
    flash_attn: bool = True,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Accumulator]:
    """PPL statistics for each file (and KLD / top-1 against ``reference`` when given).

    ``flash_attn`` defaults on, as llama-perplexity runs on CPU; with it off, PPL moves by
    ~0.3 % on SmolLM2 and no longer equals llama-perplexity's figure."""
    chunks = make_chunks(tokens, n_ctx, n_chunks, bos)
    if not chunks:
        raise ValueError(f"need at least {n_ctx} tokens, got {len(tokens)}")
    first = n_ctx // 2
    ref_lp: list[np.ndarray] = []
    if reference is not None:
        # reference log-probs of the scored positions, kept as float32 (n_chunks × n_ctx/2 × vocab)
        ref = LlamaCppModel(reference, n_ctx=n_ctx, threads=threads, flash_attn=flash_attn)
        try:
            for i, c in enumerate(chunks):
                if progress:
                    progress("reference", i, len(chunks))
                ref_lp.append(log_softmax(ref.logits(c)[first : n_ctx - 1]).astype(np.float32))
        finally:
            ref.close()
    out: dict[str, Accumulator] = {}
    for p in paths:
        acc = Accumulator()
        m = LlamaCppModel(p, n_ctx=n_ctx, threads=threads, flash_attn=flash_attn)
        try:
            for i, c in enumerate(chunks):
                if progress:
                    progress(Path(p).name, i, len(chunks))
                logits = m.logits(c)[first : n_ctx - 1]
                targets = np.asarray(c[first + 1 : n_ctx])
                acc.add(logits, targets, ref_lp[i].astype(np.float64) if ref_lp else None)
        finally:
            m.close()
        out[str(p)] = acc
    return out
