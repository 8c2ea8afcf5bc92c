"""Chunking and quality metrics, the llama-perplexity way.

Convention (llama.cpp tools/perplexity/perplexity.cpp, ``perplexity()``): the text is tokenized
once; chunk i is tokens[i·n_ctx, (i+1)·n_ctx) with its first token replaced by BOS when the
vocabulary adds one; logits at positions first = n_ctx/2 … n_ctx−2 are scored against the next
token, so each chunk scores n_ctx − 1 − n_ctx/2 tokens. PPL = exp(mean NLL); its standard error
is computed as llama-perplexity prints it (delta method on the NLL variance).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np


def make_chunks(
    tokens: list[int], n_ctx: int, n_chunks: int | None, bos: int | None
) -> list[list[int]]:
    n_max = len(tokens) // n_ctx
    n = n_max if n_chunks is None or n_chunks < 0 else min(n_chunks, n_max)
    out = []
    for i in range(n):
        chunk = list(tokens[i * n_ctx : (i + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        out.append(chunk)
    return out


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))


@dataclass
class Accumulator:
    """Running NLL / KLD / top-1 statistics over scored positions."""

    nll: list[float] = field(default_factory=list)
    kld: list[float] = field(default_factory=list)
    top1: list[bool] = field(default_factory=list)
    dp: list[float] = field(default_factory=list)  # |p_q(correct) − p_ref(correct)|

    def add(
        self, logits: np.ndarray, targets: np.ndarray, ref_logprobs: np.ndarray | None = None
    ) -> None:
        """``logits``: scored positions × vocab; ``targets``: the next token at each position."""
        lp = log_softmax(logits)
        idx = np.arange(len(targets))
        self.nll.extend((-lp[idx, targets]).tolist())
        if ref_logprobs is not None:
            p_ref = np.exp(ref_logprobs)
            self.kld.extend((p_ref * (ref_logprobs - lp)).sum(axis=1).tolist())
            self.top1.extend((lp.argmax(1) == ref_logprobs.argmax(1)).tolist())
            self.dp.extend(np.abs(np.exp(lp[idx, targets]) - p_ref[idx, targets]).tolist())

    def ppl(self) -> tuple[float, float]:
        """(PPL, standard error) as llama-perplexity reports them."""
        a = np.asarray(self.nll, dtype=np.float64)
        n = len(a)
        mean = float(a.mean())
        if n < 2:
            return math.exp(mean), float("nan")
        var = float((a * a).mean() - mean * mean)
        err = math.sqrt(max(var, 0.0) / (n - 1))
        ppl = math.exp(mean)
        return ppl, err * ppl

    def kld_stats(self) -> dict[str, float]:
        if not self.kld:
            raise ValueError("no reference was given: KLD and top-1 are undefined")
        k = np.asarray(self.kld, dtype=np.float64)
        return {
            "mean": float(k.mean()),
            "p99": float(np.percentile(k, 99)),
            "max": float(k.max()),
            "top1": float(np.mean(self.top1)),
            "mean_abs_dp": float(np.mean(self.dp)),
        }
