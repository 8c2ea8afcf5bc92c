"""Measured KLD in llama.cpp of a base file with some tensors quantized (the rest as they are).

The measurement the proxy is calibrated and checked against: the float base is rewritten by
``llama_model_quantize`` with the chosen tensors in their types and every other tensor kept in
its own type (an explicit override to F16/F32 is a copy in llama.cpp: ``cur_type == new_type``),
loaded in llama.cpp and scored on token chunks against the base's own distributions, as the
validation does (llama-perplexity's chunking: the second half of each chunk is scored).
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from quantkit.progress import Progress
from quantkit.quantize.gguf.quantizer import QuantizeOptions, ggml_type, quantize_file
from quantkit.quantize.gguf.types import GGUF_TYPES
from quantkit.targets import IMATRIX_CTX
from quantkit.validate.llamacpp import LlamaCppModel
from quantkit.validate.metrics import log_softmax, position_stats

# The file type only decides the types of tensors no override names; every quantizable tensor is
# named here. A quantized file type is needed: llama.cpp applies overrides only then.
CARRIER = GGUF_TYPES["Q8_0"]


def overrides(plan: Mapping[str, str], rest: str | None = None) -> list[tuple[str, object]]:
    """Anchored per-tensor patterns (llama.cpp takes the first pattern that matches)."""
    out: list[tuple[str, object]] = [
        (f"^{re.escape(name)}$", ggml_type(t)) for name, t in plan.items()
    ]
    if rest is not None:
        out.append((".", ggml_type(rest)))
    return out


class KLDProbe:
    """Reference log-probs of the base on ``chunks`` once; then ``kld(plan)`` per variant."""

    def __init__(
        self,
        base: Path,
        chunks: list[list[int]],
        options: QuantizeOptions,
        *,
        base_type: str = "F16",
        threads: int | None = None,
        n_ctx: int = IMATRIX_CTX,
        progress: Progress | None = None,
    ) -> None:
        self.base, self.chunks, self.threads, self.n_ctx = base, chunks, threads, n_ctx
        self.options, self.base_type = options, base_type
        self.first = n_ctx // 2
        self.progress = progress
        m = LlamaCppModel(base, n_ctx=n_ctx, threads=threads, flash_attn=True)
        try:
            self.ref = []
            for i, c in enumerate(chunks):
                self.ref.append(log_softmax(m.logits(c)[self.first : n_ctx - 1]).astype(np.float32))
                self._tick("probe reference score", i + 1)
        finally:
            m.close()

    def _tick(self, stage: str, i: int) -> None:
        if self.progress:  # counted in tokens: a chunk of a large model takes a minute
            self.progress(stage, i * self.n_ctx, len(self.chunks) * self.n_ctx)

    def kld_of_file(self, path: Path, label: str = "") -> float:
        m = LlamaCppModel(path, n_ctx=self.n_ctx, threads=self.threads, flash_attn=True)
        total, n = 0.0, 0
        try:
            for i, (c, ref) in enumerate(zip(self.chunks, self.ref, strict=True)):
                lp = log_softmax(m.logits(c)[self.first : self.n_ctx - 1])
                targets = np.asarray(c[self.first + 1 : self.n_ctx])
                _, kld, _, _ = position_stats(lp, targets, ref.astype(np.float64))
                total += float(kld.sum())
                n += len(kld)
                self._tick(f"probe {label} score".replace("  ", " "), i + 1)
        finally:
            m.close()
        return total / max(n, 1)

    def kld(self, plan: Mapping[str, str], label: str = "") -> float:
        """Mean KLD with the tensors of ``plan`` in their types, all others unchanged. The
        rewritten file lies beside the base where that folder is writable (the base's filesystem
        had room for the base)."""
        opts = replace(self.options, overrides=overrides(plan, self.base_type), pure=False)
        near = self.base.parent if os.access(self.base.parent, os.W_OK) else None
        with tempfile.TemporaryDirectory(prefix=".quantkit-probe-", dir=near) as tmp:
            out = Path(tmp) / "probe.gguf"
            quantize_file(self.base, out, CARRIER, opts, progress=self._write_progress(label))
            return self.kld_of_file(out, label)

    def _write_progress(self, label: str) -> Progress | None:
        if self.progress is None:
            return None
        p = self.progress
        return lambda _stage, done, total: p(
            f"probe {label} quantize".replace("  ", " "), done, total
        )
