"""Surrogates generate, measurement selects: the file ``gguf:auto`` ships.

The sensitivity pass predicts; on weights that sit on no quantization grid its best plan can
still lose to one of llama.cpp's hand-made mixes (docs/cli.md has the measurement). So the
planner proposes several files for the budget and llama.cpp decides:

- **solver plans**, one per surrogate: the kind × layer gains (the plan), the per-kind gains
  alone, and their geometric mean (a plan between the two); and the plan under the kind × layer
  gains within a trust region around the largest stock file that fits (each tensor within
  0.6–1.6× the bytes of its type there: build.NEAR);
- **llama.cpp's own file types that fit the budget** (Q4_K_M, Q4_K_S, Q5_0, …, with the same
  importance matrix), typed by llama.cpp's quantizer in a dry run, so their exact size and
  predicted KLD are known before anything is written.

The candidates are ranked by predicted KLD and the best MAX_CANDIDATES (fewer on large models:
SELECT_PARAMS) are written and scored in llama.cpp on calibration chunks held out from the
sensitivity probes and from the importance matrix (as many tokens as a probe scores:
PROBE_TOKEN_PARAMS); the best measured file ships, so on those chunks it is never worse than any
stock file measured beside it. The solver's own plan and the largest stock file that fits are
always measured. The report lists every candidate (measured or not), the winner and its margin
over the best stock file measured.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from quantkit.progress import Progress
from quantkit.quantize.gguf.auto import sizes
from quantkit.quantize.gguf.auto.sensitivity import Sensitivity
from quantkit.quantize.gguf.quantizer import QuantizeOptions, imatrix_kvs, quantize_file
from quantkit.quantize.gguf.types import GGUF_TYPES, GGUFType

MAX_CANDIDATES = 8  # files written and scored at most
# A candidate costs one write of the whole file (its scoring is bounded in tokens like the
# probes'), so the count falls with the parameters: 8 up to 0.75 B, 4 at 1.5 B, 2 (the plan and
# the largest stock file that fits) from 3 B on.
SELECT_PARAMS = 6e9
MIN_CANDIDATES = 2


@dataclass
class Candidate:
    name: str  # "auto", "auto:per-kind", "Q4_K_M" …
    source: str  # "solver" | "stock"
    types: dict[str, str]  # quantizable tensor -> ggml type
    file_bytes: int
    predicted_kld: float | None  # None: a type the sensitivity did not measure
    ftype: GGUFType  # the file type written (a stock file's own; a plan's label)
    measured_kld: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "source": self.source, "bytes": self.file_bytes,
                "predicted_kld": self.predicted_kld, "measured_kld": self.measured_kld}  # fmt: skip


def n_candidates(n_params: int) -> int:
    n = int(SELECT_PARAMS // max(1, n_params))
    return max(MIN_CANDIDATES, min(MAX_CANDIDATES, n))


def surrogates(sens: Sensitivity) -> dict[str, Sensitivity]:
    """The sensitivity variants whose plans compete (only those the probes measured)."""
    out = {"auto": sens}
    if sens.weighting == "fisher":  # the imatrix-weighted errors, per-kind gains
        out["auto:per-kind"] = sens.per_kind()
    elif sens.tensor_gains and sens.kind_only:
        kind = sens.per_kind()
        out["auto:per-kind"] = kind
        blend = {
            n: math.sqrt(g * kind.gains.get(n_kind, g))
            for n, g, n_kind in ((n, g, _kind(n)) for n, g in sens.tensor_gains.items())
        }
        out["auto:blend"] = replace(sens, tensor_gains=blend)
    return out


def _kind(name: str) -> str:
    parts = name.split(".")
    return parts[2] if parts[0] == "blk" and len(parts) > 2 else parts[0]


def stock_candidates(
    base: Path,
    options: QuantizeOptions,
    slots: list[sizes.Slot],
    sens: Sensitivity,
    fits: Any,
) -> list[Candidate]:
    """Every quantized llama.cpp file type whose file ``fits`` (a predicate on (file bytes,
    tensor bytes)), typed by llama.cpp's own dry run with ``options`` (the user's matrix; its
    mixes apply), with its exact size and predicted KLD."""
    by_name = {s.name: s for s in slots}
    align = sizes.alignment(base)
    out = []
    for g in GGUF_TYPES.values():
        if not g.quantized or g.experts_only or (g.imatrix and not options.imatrix):
            continue
        try:
            rep = quantize_file(base, None, g, options, dry_run=True)
        except Exception:  # noqa: BLE001 - a type this model cannot take is no candidate
            continue
        types = {n: t for n, t in rep.planned.items() if n in by_name and by_name[n].quantizable}
        nbytes = {
            s.name: sizes.tensor_bytes(rep.planned.get(s.name, s.base_type), s.ncols, s.nrows)
            if s.quantizable else s.base_bytes
            for s in slots
        }  # fmt: skip
        meta = sizes.metadata_bytes(base, int(g.ftype), imatrix_kvs(options))
        file_bytes = meta + sum(sizes.padded(n, align) for n in nbytes.values())
        if not fits(file_bytes, sum(nbytes.values())):
            continue
        known = all(t in sens.errors.get(n, {}) for n, t in types.items())
        kld = sum(sens.kld(by_name[n], t) for n, t in types.items()) if known else None
        out.append(Candidate(g.name, "stock", types, file_bytes, kld, g))
    return out


def shortlist(cands: list[Candidate], n: int) -> list[Candidate]:
    """The ``n`` to measure: the solver's plan and the largest stock file first, then by
    predicted KLD (unpredicted last); identical type assignments once."""
    seen: set[tuple[tuple[str, str], ...]] = set()
    unique = []
    for c in cands:
        key = tuple(sorted(c.types.items()))
        if key not in seen:
            seen.add(key)
            unique.append(c)
    stock = [c for c in unique if c.source == "stock"]
    first = [unique[0]] + ([max(stock, key=lambda c: c.file_bytes)] if stock else [])
    rest = sorted(
        (c for c in unique if c not in first),
        key=lambda c: (c.predicted_kld is None, c.predicted_kld or 0.0),
    )
    return (first + rest)[:n]


def measure(
    cands: list[Candidate],
    write: Any,
    score: Any,
    dst: Path,
    progress: Progress | None = None,
) -> Candidate:
    """Write (``write(candidate, path)``) and score (``score(path) -> KLD``) each candidate in
    turn beside ``dst``, keeping only the best file so far; the winner ends at ``dst``."""
    near = dst.parent if os.access(dst.parent, os.W_OK) else None
    best: Candidate | None = None
    with tempfile.TemporaryDirectory(prefix=".quantkit-select-", dir=near) as tmp:
        best_path = Path(tmp) / "best.gguf"
        for i, c in enumerate(cands):
            path = Path(tmp) / "candidate.gguf"
            write(c, path)
            c.measured_kld = score(path, c.name)
            if best is None or c.measured_kld < (best.measured_kld or 0.0):
                best = c
                path.replace(best_path)
            else:
                path.unlink()
            if progress:
                progress("select candidates", i + 1, len(cands))
        assert best is not None
        shutil.move(best_path, dst)
    return best


def summary(cands: list[Candidate], winner: Candidate, chunks: int, tokens: int,
            seconds: float) -> dict[str, Any]:  # fmt: skip
    """The report's ``selection``: every candidate, the winner, and its margin over the best
    measured stock file (negative: lower KLD)."""
    stock = [c for c in cands if c.source == "stock" and c.measured_kld is not None]
    ref = min(stock, key=lambda c: c.measured_kld or 0.0) if stock else None
    margin = None
    if ref is not None and ref.measured_kld:
        margin = (winner.measured_kld or 0.0) / ref.measured_kld - 1
    return {
        "chunks": chunks,
        "tokens": tokens,
        "seconds": round(seconds, 1),
        "candidates": [c.to_json() for c in cands],
        "winner": winner.name,
        "best_reference": ref.name if ref else None,
        "margin": margin,
    }
