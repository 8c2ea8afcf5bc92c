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
        if ref_logprobs is None:
            self.nll.extend((-lp[np.arange(len(targets)), targets]).tolist())
        else:
            self.extend(position_stats(lp, targets, ref_logprobs))

    def extend(self, stats: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]) -> None:
        """Append per-position (NLL, KLD, top-1, |Δp|) from ``position_stats(_topk)``."""
        nll, kld, top1, dp = stats
        self.nll.extend(nll.tolist())
        self.kld.extend(kld.tolist())
        self.top1.extend(top1.tolist())
        self.dp.extend(dp.tolist())

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


def renormalize(logprobs: np.ndarray) -> np.ndarray:
    """Stored (possibly float16) log-probs → float32 log-probs that sum to 1 again.

    Renormalizing makes the float16 rounding error enter KLD only at second order when the two
    distributions are close (docs/report-schema.md, "Reference cache")."""
    x = np.asarray(logprobs, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True, dtype=np.float64))).astype(
        np.float32
    )


def position_stats(
    lp_q: np.ndarray, targets: np.ndarray, lp_ref: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact per-position (NLL, KLD(ref‖q), top-1 agreement, |Δp| of the target) from full
    log-prob arrays (positions × vocab)."""
    idx = np.arange(len(targets))
    p_ref = np.exp(lp_ref)
    kld = (p_ref * (lp_ref - lp_q)).sum(axis=1, dtype=np.float64)
    lq_t = lp_q[idx, targets].astype(np.float64)
    nll = -lq_t
    top1 = lp_q.argmax(1) == lp_ref.argmax(1)
    dp = np.abs(np.exp(lq_t) - p_ref[idx, targets])
    return nll, np.maximum(kld, 0.0), top1, dp


def position_stats_topk(
    topk_ids: np.ndarray,
    topk_lp: np.ndarray,
    target_lp: np.ndarray,
    targets: np.ndarray,
    lp_ref: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Approximate stats when the engine returns only its top-k log-probs (e.g. vLLM).

    KLD is taken over the engine's top-k tokens plus one bucket for all remaining mass:
    Σ_{i∈K} p_i log(p_i/q_i) + P_rest log(P_rest/Q_rest). By the log-sum inequality this is a
    lower bound of the exact KLD (equal when k covers the vocabulary)."""
    idx = np.arange(len(targets))[:, None]
    p_ref = np.exp(lp_ref.astype(np.float64))
    pk = p_ref[idx, topk_ids]
    lqk = topk_lp.astype(np.float64)
    qk = np.exp(lqk)
    lpk = np.log(np.maximum(pk, 1e-300))
    p_rest = np.clip(1.0 - pk.sum(1), 1e-300, 1.0)
    q_rest = np.clip(1.0 - qk.sum(1), 1e-300, 1.0)
    kld = (pk * (lpk - lqk)).sum(1) + p_rest * np.log(p_rest / q_rest)
    nll = -target_lp.astype(np.float64)
    top1 = topk_ids[:, 0] == lp_ref.argmax(1)
    dp = np.abs(np.exp(-nll) - p_ref[np.arange(len(targets)), targets])
    return nll, np.maximum(kld, 0.0), top1, dp
