"""``gguf:auto``: the plan (sensitivity → solver over exact sizes) and its writing by llama.cpp.

The plan names a type for every quantizable tensor; it is written by ``llama_model_quantize``
with one anchored override per tensor, so llama.cpp's own mix rules never apply, and the file
is then read back: its tensor types and size must be the plan's.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.checkpoint import Checkpoint
from quantkit.errors import EngineError, InputError
from quantkit.progress import Progress
from quantkit.quantize.gguf.auto import select, sizes
from quantkit.quantize.gguf.auto.probe import overrides
from quantkit.quantize.gguf.auto.select import Candidate
from quantkit.quantize.gguf.auto.sensitivity import Sensitivity, measure
from quantkit.quantize.gguf.auto.solver import BudgetTooSmall, Option, solve
from quantkit.quantize.gguf.auto.spec import AutoSpec
from quantkit.quantize.gguf.quantizer import (
    QuantizeOptions,
    QuantizeReport,
    imatrix_kvs,
    quantize_file,
)
from quantkit.quantize.gguf.types import GGUF_TYPES, GGUFType
from quantkit.targets import IMATRIX_CTX

PROBE_CHUNKS = 4  # calibration chunks the per-kind gains are measured on


@dataclass
class AutoPlan:
    spec: AutoSpec
    types: dict[str, str]  # quantizable tensor -> ggml type
    tensor_kld: dict[str, float]  # predicted contribution of each tensor
    tensor_bytes: dict[str, int]  # exact bytes of each tensor's data (all tensors)
    file_bytes: int  # predicted size of the file, exactly
    n_params: int
    budget: int  # what the solver was given: file bytes (size=) or tensor bytes (bpw=)
    ftype: GGUFType
    sensitivity: Sensitivity
    slots: list[sizes.Slot] = field(default_factory=list, repr=False)
    selection: dict[str, Any] | None = None  # what select_and_write measured (None: not run)

    @property
    def predicted_kld(self) -> float:
        return sum(self.tensor_kld.values())

    @property
    def bpw(self) -> float:
        return sum(self.tensor_bytes.values()) * 8 / self.n_params

    def error_bar(self) -> dict[str, float]:
        """Relative standard error of the sampled estimates of the chosen types: median, 95th
        percentile, largest (0 where every row was measured)."""
        se = self.sensitivity.rel_se
        v = sorted(se.get(n, {}).get(t, 0.0) for n, t in self.types.items())
        if not v:
            return {}
        return {"median": v[len(v) // 2], "p95": v[min(len(v) - 1, int(0.95 * len(v)))],
                "max": v[-1]}  # fmt: skip

    def predicted(self, types: dict[str, str]) -> float | None:
        """Another assignment's KLD as this plan's sensitivity predicts it (None: a type it did
        not measure)."""
        by_name = {s.name: s for s in self.slots}
        if not all(t in self.sensitivity.errors.get(n, {}) for n, t in types.items()):
            return None
        return sum(self.sensitivity.kld(by_name[n], t) for n, t in types.items())

    def to_json(self) -> dict[str, Any]:
        return {
            "budget": {"size": self.spec.size, "bpw": self.spec.bpw},
            "predicted_bytes": self.file_bytes,
            "predicted_bpw": round(self.bpw, 4),
            "predicted_kld": self.predicted_kld,
            "types": self.types,
            "tensor_kld": self.tensor_kld,
            "histogram": dict(Counter(self.types.values()).most_common()),
            "sensitivity": {
                "cache_hit": self.sensitivity.cache_hit,
                "gains": self.sensitivity.gains,
                "seconds": self.sensitivity.seconds,
                "sample_values": self.sensitivity.sample,
                "weighting": self.sensitivity.weighting,
                "probe_tokens": self.sensitivity.probe_tokens,
                "error_bar": self.error_bar(),
                "layer_gains": self.sensitivity.layer_gains,
                "probe_kld": self.sensitivity.probe_kld,
            },
            "selection": self.selection,
        }


# A trust region around a stock mix: each tensor may move to types from 0.6× to 1.6× the bytes
# of its type in the mix (Q5_0 → Q4_0 … Q8_0; Q6_K → Q4_K … Q8_0), where the surrogate's
# marginal predictions are the ones its probes measured near.
NEAR = (0.6, 1.6)


def _near(s: sizes.Slot, near: dict[str, str] | None) -> dict[str, int]:
    t = (near or {}).get(s.name)
    if t is None or t not in s.options:
        return s.options
    lo, hi = NEAR[0] * s.options[t], NEAR[1] * s.options[t]
    return {c: n for c, n in s.options.items() if lo <= n <= hi}


def _options(o: QuantizeOptions) -> QuantizeOptions:
    """The plan owns every tensor: no llama.cpp mix, no output/embedding type, no user overrides."""
    return replace(o, output_type=None, embedding_type=None, pure=False, overrides=[],
                   leave_output=False)  # fmt: skip


def _file_type(types: dict[str, str], nbytes: dict[str, int]) -> GGUFType:
    """general.file_type: the first llama.cpp file type whose main type holds the most bytes
    (a label only; a quantized one, since llama.cpp applies overrides only under those)."""
    by_type: Counter[str] = Counter()
    for name, t in types.items():
        by_type[t] += nbytes[name]
    for t, _ in by_type.most_common():
        for g in GGUF_TYPES.values():
            if g.quantized and g.main == t and not (g.imatrix or g.via or g.experts_only):
                return g
    return GGUF_TYPES["Q8_0"]


def plan_auto(
    base: Path,
    spec: AutoSpec,
    options: QuantizeOptions,
    *,
    probe_chunks: list[list[int]] | None = None,
    n_ctx: int = IMATRIX_CTX,
    threads: int | None = None,
    progress: Progress | None = None,
    sensitivity: Sensitivity | None = None,
    near: dict[str, str] | None = None,
    checkpoint: Checkpoint | None = None,
) -> AutoPlan:
    """Measure (or reuse) the sensitivity of every tensor of the float ``base`` and choose the
    types that minimise the predicted KLD within the budget (``near``: each tensor only within
    NEAR of the bytes of its type there; ``sensitivity``: one already
    measured for these slots, e.g. to compare passes; ``checkpoint``: the HF checkpoint the base
    was converted from, for Fisher-weighted errors — sensitivity.measure)."""
    if not options.imatrix:
        raise InputError(
            "gguf:auto needs an importance matrix",
            "pass --calib TEXT (computed on the way) or --imatrix FILE",
        )
    opts = _options(options)
    slots = sizes.slots(base, set(opts.imatrix or {}), spec.types)
    fixed = [s for s in slots if not s.quantizable]
    free = [s for s in slots if s.quantizable]
    empty = [s.name for s in free if not s.options]
    if empty:
        raise InputError(
            f"gguf:auto: no candidate type fits {empty[0]} ({free[0].ncols if free else 0}-wide rows)"
            + (f" and {len(empty) - 1} more" if len(empty) > 1 else ""),
            "add a type with 32-wide blocks to types= (Q8_0, Q5_0, Q4_0, IQ4_NL)",
        )
    n_params = sum(s.n_elements for s in slots)
    align = sizes.alignment(base)
    if spec.size is not None:
        probe_ftype = GGUF_TYPES["Q8_0"]  # the metadata's size does not depend on the file type
        meta = sizes.metadata_bytes(base, int(probe_ftype.ftype), imatrix_kvs(opts))
        budget = spec.size - meta - sum(sizes.padded(s.base_bytes, align) for s in fixed)
        cost = lambda n: sizes.padded(n, align)  # noqa: E731 - each tensor padded to alignment
    else:
        assert spec.bpw is not None
        budget = int(spec.bpw * n_params / 8) - sum(s.base_bytes for s in fixed)
        cost = lambda n: n  # noqa: E731 - bits per weight count the data alone
    sens = sensitivity or measure(base, slots, opts, probe_chunks=probe_chunks, n_ctx=n_ctx,
                                  threads=threads, progress=progress, checkpoint=checkpoint)  # fmt: skip
    choices = {
        s.name: [Option(t, cost(n), sens.kld(s, t)) for t, n in _near(s, near).items()]
        for s in free
    }
    try:
        sol = solve(choices, budget)
    except BudgetTooSmall as e:
        smallest = e.smallest + (spec.size - budget if spec.size is not None else 0)
        what = (
            f"{spec.size:,} bytes" if spec.size is not None
            else f"{spec.bpw:g} bits per weight"
        )  # fmt: skip
        least = (
            f"{smallest:,} bytes" if spec.size is not None
            else f"{(e.smallest + spec.bpw * n_params / 8 - budget) * 8 / n_params:.3f} bits per weight"
        )  # fmt: skip
        raise InputError(
            f"gguf:auto: {what} is below the smallest file these types can make ({least})",
            "raise the budget or add smaller types to types= (e.g. Q2_K, IQ2_XS)",
        ) from None
    types = {name: o.type for name, o in sol.choice.items()}
    nbytes = {s.name: s.base_bytes for s in fixed}
    nbytes.update({s.name: s.options[types[s.name]] for s in free})
    ftype = _file_type(types, nbytes)
    meta = sizes.metadata_bytes(base, int(ftype.ftype), imatrix_kvs(opts))
    file_bytes = meta + sum(sizes.padded(n, align) for n in nbytes.values())
    return AutoPlan(
        spec, types, {n: o.kld for n, o in sol.choice.items()}, nbytes, file_bytes, n_params,
        budget, ftype, sens, slots,
    )  # fmt: skip


def write_auto(
    base: Path,
    plan: AutoPlan,
    dst: Path,
    options: QuantizeOptions,
    *,
    progress: Progress | None = None,
) -> QuantizeReport:
    """Write the plan with llama.cpp's quantizer and check the file is the plan."""
    from quantkit.quantize.gguf.reader import read_gguf

    opts = replace(_options(options), overrides=overrides(plan.types))
    rep = quantize_file(base, dst, plan.ftype, opts, progress=progress)
    info = read_gguf(dst)
    got = {t.name: t.type for t in info.tensors if t.name in plan.types}
    wrong = [n for n, t in plan.types.items() if got.get(n) != t]
    if wrong or info.size != plan.file_bytes:
        raise EngineError(
            f"llama.cpp did not write the plan: {len(wrong)} tensor(s) differ"
            + (
                f" (e.g. {wrong[0]}: {got.get(wrong[0])} for {plan.types[wrong[0]]})"
                if wrong
                else ""
            )
            + f"; {info.size:,} bytes for {plan.file_bytes:,} predicted"
        )
    return rep


def candidates(
    base: Path, plan: AutoPlan, options: QuantizeOptions
) -> tuple[list[Candidate], dict[str, AutoPlan]]:
    """The solver's plans under each surrogate, then llama.cpp's file types that fit the same
    budget; predicted KLD of all under the plan's own sensitivity."""
    plans = {"auto": plan}
    for name, sens in select.surrogates(plan.sensitivity).items():
        if name != "auto":
            plans[name] = plan_auto(base, plan.spec, options, sensitivity=sens)
    out = [
        Candidate(name, "solver", p.types, p.file_bytes, plan.predicted(p.types), p.ftype)
        for name, p in plans.items()
    ]
    spec = plan.spec

    def fits(file_bytes: int, tensor_bytes: int) -> bool:
        if spec.size is not None:
            return file_bytes <= spec.size
        return tensor_bytes * 8 / plan.n_params <= (spec.bpw or 0.0)

    stock = select.stock_candidates(base, options, plan.slots, plan.sensitivity, fits)
    for c in stock:
        c.predicted_kld = plan.predicted(c.types)
    if stock:  # the solver within a trust region around the largest stock file that fits
        ref = max(stock, key=lambda c: c.file_bytes)
        name = f"auto:near-{ref.name}"
        plans[name] = plan_auto(base, plan.spec, options, sensitivity=plan.sensitivity,
                                near=ref.types)  # fmt: skip
        p = plans[name]
        out.append(
            Candidate(name, "solver", p.types, p.file_bytes, plan.predicted(p.types), p.ftype)
        )
    return out + stock, plans


def select_and_write(
    base: Path,
    plan: AutoPlan,
    dst: Path,
    options: QuantizeOptions,
    chunks: list[list[int]],
    *,
    n_ctx: int = IMATRIX_CTX,
    threads: int | None = None,
    progress: Progress | None = None,
) -> tuple[AutoPlan, QuantizeReport]:
    """Write the candidates that the bound allows, score each in llama.cpp on ``chunks`` (held
    out from the probes and the matrix) and leave the best at ``dst``; the returned plan
    describes the file written, with ``selection`` filled in."""
    from quantkit.quantize.gguf.auto.probe import KLDProbe

    t0 = time.perf_counter()
    from quantkit.quantize.gguf.auto.sensitivity import probe_budget

    cands, plans = candidates(base, plan, options)
    chunks = probe_budget(chunks, plan.n_params)
    tokens = sum(len(c) for c in chunks)
    todo = select.shortlist(cands, select.n_candidates(plan.n_params))
    base_type = next((s.base_type for s in plan.slots if s.quantizable), "F16")
    probe = KLDProbe(base, chunks, _options(options), base_type=base_type, threads=threads,
                     n_ctx=n_ctx, progress=progress)  # fmt: skip
    reports: dict[str, QuantizeReport] = {}

    def write(c: Candidate, path: Path) -> None:
        if c.source == "solver":
            reports[c.name] = write_auto(base, plans[c.name], path, options, progress=progress)
            return
        reports[c.name] = quantize_file(base, path, c.ftype, options, progress=progress)
        if path.stat().st_size != c.file_bytes:
            raise EngineError(
                f"llama.cpp wrote {c.name} in {path.stat().st_size:,} bytes, "
                f"{c.file_bytes:,} predicted from its dry run"
            )

    winner = select.measure(todo, write, probe.kld_of_file, dst, progress)
    sel = select.summary(cands, winner, len(chunks), tokens, time.perf_counter() - t0)
    if winner.source == "solver":
        shipped = replace(plans[winner.name], selection=sel)
    else:
        by_name = {s.name: s for s in plan.slots}
        nbytes = {s.name: s.base_bytes for s in plan.slots if not s.quantizable}
        nbytes.update({n: sizes.tensor_bytes(t, by_name[n].ncols, by_name[n].nrows)
                       for n, t in winner.types.items()})  # fmt: skip
        kld = {n: plan.sensitivity.kld(by_name[n], t) for n, t in winner.types.items()
               if t in plan.sensitivity.errors.get(n, {})}  # fmt: skip
        shipped = replace(plan, types=winner.types, tensor_bytes=nbytes, tensor_kld=kld,
                          file_bytes=winner.file_bytes, ftype=winner.ftype, selection=sel)  # fmt: skip
    return shipped, reports[winner.name]


def dry_selection(base: Path, plan: AutoPlan, options: QuantizeOptions, why: str) -> AutoPlan:
    """The candidates a written run would measure, with their predictions, and why none was."""
    cands, _ = candidates(base, plan, options)
    sel = {"measured": False, "why": why, "candidates": [c.to_json() for c in cands]}
    return replace(plan, selection=sel)
