"""``quantkit demo``: convert to F16 and Q8_0, load both in llama.cpp, compare them on a short text."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from quantkit.convert import convert
from quantkit.table import human_bytes

# A short neutral text (written for quantkit) to score both files on the same tokens.
DEMO_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. "
    "In spring the water rises, and the children watch the boats drift slowly toward the sea. "
    "Every morning the baker opens his shop at six, and the smell of fresh bread fills the "
    "street. Farmers bring vegetables to the market square, where people meet to talk about "
    "the weather, the harvest and the news from the city. In the evening the lamps are lit one "
    "by one, and the bells of the church ring as the sun goes down behind the hills."
)
PROMPT = "The capital of France is"


def _nll(logits: np.ndarray, tokens: list[int]) -> np.ndarray:
    x = logits[:-1].astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    logz = m[:, 0] + np.log(np.exp(x - m).sum(axis=1))
    return logz - x[np.arange(len(tokens) - 1), tokens[1:]]


def run_demo(model: Path, output: Path, *, threads: int | None = None, progress=None):
    from quantkit.gguf_file import read_gguf
    from quantkit.validate.llamacpp import LlamaCppModel

    res = convert(
        model, ["gguf:F16", "gguf:Q8_0"], output, force=True, threads=threads, progress=progress
    )
    rows = []
    ref_argmax = None
    sample = ""
    for art in res.artifacts:
        m = LlamaCppModel(art.path, n_ctx=512, threads=threads)
        try:
            tokens = m.tokenize(DEMO_TEXT)
            logits = m.logits(tokens)
            ppl = float(np.exp(_nll(logits, tokens).mean()))
            argmax = logits[:-1].argmax(axis=1)
            if ref_argmax is None:
                ref_argmax, agree = argmax, "-"
            else:
                agree = f"{100 * float((argmax == ref_argmax).mean()):.1f}%"
            sample, tps = m.generate(PROMPT, 16)
        finally:
            m.close()
        info = read_gguf(art.path)
        rows.append(
            [
                art.type,
                human_bytes(art.size),
                f"{info.bpw:.2f}",
                f"{m.load_seconds:.2f}s",
                f"{ppl:.2f}",
                agree,
                f"{tps:.1f}",
                str(art.path),
            ]
        )
    return rows, PROMPT + sample
