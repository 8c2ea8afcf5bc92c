"""``gptq:auto``'s selection: surrogates propose, measurement in vLLM decides what ships.

The sensitivity model (sensitivity.py) ranks schemes per group from round-to-nearest error and
one gain per layer kind; what GPTQ then does and how the errors add up in the logits it does not
see. So the solver proposes a few plans at the budget and the uniform schemes that fit it are
always added; each is exported as the export does (one llm-compressor run, GPTQ) and scored in
vLLM through ``quantkit validate``'s harness (top-k KLD against the float model in
transformers) on held-out calibration chunks: windows of the calibration text after those the
sensitivity and GPTQ calibrate on, never the evaluation text. The candidate with the lowest
measured KLD ships, so on those chunks the result is never worse than the uniform scheme at the
same bits.

Cost, bounded: at most MAX_SOLVER solver plans (identical ones counted once) + MAX_UNIFORM
uniform schemes, each one GPTQ export and one vLLM start scoring SELECT_CHUNKS chunks; the
winner is exported once more as the output. Measured KLDs are cached by content (the model,
the calibration and held-out ids, every candidate's recipe), so a rerun exports only the winner.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import InputError
from quantkit.progress import Progress
from quantkit.quantize.vllm.auto.groups import Group
from quantkit.quantize.vllm.auto.plan import (
    DTYPE_BITS,
    AutoPlan,
    GroupChoice,
    MixedTarget,
    choose,
    group_options,
    mixed_target,
)
from quantkit.quantize.vllm.auto.schemes import SHAPE_BITS, Scheme, scheme
from quantkit.quantize.vllm.auto.sensitivity import Sensitivity

CACHE_VERSION = "1"
MAX_SOLVER = 3  # solver plans measured (per-kind gains, raw error, no float layers)
MAX_UNIFORM = 3  # uniform schemes measured: the ones closest to the budget
SELECT_CHUNKS = 8  # held-out chunks each candidate is scored on
SELECT_CTX = 512  # their length (validate's default --ctx: half context, half scored)


@dataclass
class Candidate:
    name: str  # e.g. "solver", "solver-raw", "uniform-w4g32"
    source: str  # "solver" or "uniform"
    plan: AutoPlan
    measured_kld: float | None = None
    top1_pct: float | None = None
    error: str | None = None  # why it was not scored

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "source": self.source,
            "bits": round(self.plan.bits, 4),
            "predicted_kld": self.plan.predicted_kld,
            "measured_kld": self.measured_kld,
            "top1_pct": self.top1_pct,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class Selection:
    candidates: list[Candidate]
    chunks: int = 0
    tokens: int = 0
    seconds: float = 0.0
    cache_hit: bool = False
    dry_run: bool = False
    notes: list[str] = field(default_factory=list)
    unmeasured: str | None = None  # the candidate that ships when none could be measured

    @property
    def scored(self) -> list[Candidate]:
        return [c for c in self.candidates if c.measured_kld is not None]

    @property
    def winner(self) -> Candidate | None:
        return min(self.scored, key=lambda c: c.measured_kld or 0.0, default=None)

    @property
    def reference(self) -> Candidate | None:
        """The best measured uniform candidate."""
        uni = [c for c in self.scored if c.source == "uniform"]
        return min(uni, key=lambda c: c.measured_kld or 0.0, default=None)

    def to_json(self) -> dict[str, Any]:
        w, r = self.winner, self.reference
        margin = None
        if w and r and r.measured_kld:
            margin = (w.measured_kld - r.measured_kld) / r.measured_kld  # type: ignore[operator]
        return {
            **({"dry_run": True} if self.dry_run else {}),
            "chunks": self.chunks,
            "tokens": self.tokens,
            "seconds": round(self.seconds, 1),
            "cache_hit": self.cache_hit,
            "candidates": [c.to_json() for c in self.candidates],
            "winner": w.name if w else self.unmeasured,
            "best_reference": r.name if r else None,
            "margin": margin,
            "notes": self.notes,
        }


# -- the candidates ------------------------------------------------------------------------------


def _plan_of(base: AutoPlan, groups: Sequence[Group], picks: dict[str, Scheme],
             sens: Sensitivity, dtype_bits: int) -> AutoPlan:  # fmt: skip
    """``base`` with the schemes ``picks`` (group -> scheme); predicted KLD under the per-kind
    gains whichever error the plan was solved with, so that every candidate's prediction is
    comparable."""
    choices = [
        GroupChoice(g.name, g.kind, picks[g.name].name, g.cost_bits(picks[g.name], dtype_bits)
                    / g.weights, g.weights, sens.kld(g, picks[g.name].name))
        for g in groups
    ]  # fmt: skip
    cost = sum(g.cost_bits(picks[g.name], dtype_bits) for g in groups)
    return dataclasses.replace(base, choices=choices, cost_bits=cost)


def candidates(plan: AutoPlan, groups: Sequence[Group]) -> list[Candidate]:
    """The solver's plans at the budget and the uniform schemes that fit it (module doc)."""
    sens = plan.sensitivity
    assert sens is not None
    dtype_bits = DTYPE_BITS.get(plan.dtype, 16)
    schemes = [s for s in (scheme(n) for n in plan.candidates) if s is not None]
    options = group_options(groups, schemes)
    by_name = {s.name: s for s in schemes}
    out: list[Candidate] = []

    def key(picks: dict[str, Scheme]) -> tuple[str, ...]:
        return tuple(picks[g.name].name for g in groups)

    # uniform schemes that fit every group and the budget; weight_shape (128 bits per packed
    # Linear, metadata) is not counted against it, so W4 g32 is a candidate at bits=4.5
    fits = []
    for s in schemes:
        if s.kind == "float" or not all(g.fits(s) for g in groups):
            continue
        shapes = sum(len(g.members) for g in groups) * SHAPE_BITS if s.kind == "int" else 0
        cost = sum(g.cost_bits(s, dtype_bits) for g in groups)
        if cost - shapes <= plan.budget_bits:
            fits.append((cost, s))
    uniform = [(f"uniform-{s.name}", {g.name: s for g in groups})
               for _, s in sorted(fits, key=lambda x: -x[0])[:MAX_UNIFORM]]  # fmt: skip
    # solver variants: its plan; the plan by raw activation-weighted error (no per-kind gain:
    # where the gains mislead, docs/cli.md's down_proj case); the plan without float layers.
    # One that equals a uniform scheme is that uniform candidate (the reference), once.
    seen = {key(p) for _, p in uniform}
    no_float = {g: [s for s in o if s.kind != "float"] for g, o in options.items()}
    variants: list[tuple[str, Sensitivity, dict[str, list[Scheme]]]] = [
        ("solver", sens, options),
        ("solver-raw", dataclasses.replace(sens, gains={}), options),
    ]
    if all(no_float.values()) and no_float != options:
        variants.append(("solver-nofloat", sens, no_float))
    for name, s_, opts in variants[:MAX_SOLVER]:
        try:
            choices = choose(plan.spec, groups, opts, s_, dtype_bits)[0]
        except InputError:  # the budget is below this variant's smallest mix
            continue
        picks = {c.group: by_name[c.scheme] for c in choices}
        if key(picks) not in seen:
            seen.add(key(picks))
            out.append(Candidate(name, "solver", _plan_of(plan, groups, picks, sens, dtype_bits)))
    for name, picks in uniform:
        out.append(Candidate(name, "uniform", _plan_of(plan, groups, picks, sens, dtype_bits)))
    return out


def candidate_target(c: Candidate, groups: Sequence[Group], label: bool = True) -> MixedTarget:
    """The candidate as the target the export writes (``label``: its folder names it)."""
    t = mixed_target(c.plan, groups)
    return t.model_copy(update={"candidate": c.name}) if label else t


# -- held-out chunks -----------------------------------------------------------------------------


def heldout_text(model_dir: Path, calib: Path, samples: int, seq_len: int) -> str:
    """The calibration text after the windows calibration.calibration_ids takes (the first
    ``samples`` × ``seq_len`` tokens) and one window more, from a line start where there is
    one: text neither the sensitivity nor GPTQ has seen; "" when nothing is left."""
    from quantkit.quantize.vllm.calibration import tokenize_calibration
    from quantkit.text import read_text

    text = read_text(calib)
    used = (samples + 1) * seq_len

    def past(pos: int) -> bool:
        return len(tokenize_calibration(model_dir, text[:pos])[0]) >= used

    if not past(len(text)):
        return ""
    cuts = [0] + [i + 1 for i, ch in enumerate(text) if ch == "\n"]
    if not past(cuts[-1]):  # no line start after the calibration windows: any character
        cuts = list(range(0, len(text), 16))
    lo, hi = 0, len(cuts) - 1  # the first cut whose prefix holds ``used`` tokens
    while lo < hi:
        mid = (lo + hi) // 2
        if past(cuts[mid]):
            hi = mid
        else:
            lo = mid + 1
    return text[cuts[lo] :] if past(cuts[lo]) else ""


# -- measurement ---------------------------------------------------------------------------------


def export_candidates(model_dir: Path, cands: Sequence[Candidate], groups: Sequence[Group],
                      settings: Any, out: Path, progress: Progress | None = None,
                      force: bool = False) -> dict[str, Path]:  # fmt: skip
    """Every candidate written by one llm-compressor run into ``out``; name -> folder."""
    from quantkit.quantize.vllm.export import export_vllm

    ts = [candidate_target(c, groups) for c in cands]
    s = dataclasses.replace(settings, layouts=("compressed-tensors",))
    res = export_vllm(model_dir, ts, out, s, progress=progress, force=force)
    return {c.name: a.path for c, a in zip(cands, res.artifacts, strict=True)}


def score(model_dir: Path, folders: dict[str, Path], text: Path, chunks: int,
          threads: int | None, progress: Progress | None = None) -> dict[str, Any]:  # fmt: skip
    """``quantkit validate``'s report for ``folders`` (vLLM) against ``model_dir`` on ``text``,
    ``chunks`` chunks of SELECT_CTX tokens; no speed run, no chat check."""
    from quantkit.validate.harness import Settings, validate

    s = Settings(ctx=SELECT_CTX, chunks=chunks, threads=threads, pp=0, tg=0, chat=False,
                 vllm_eager=True, hf_engine="vllm")  # fmt: skip
    return validate(list(folders.values()), model_dir, text, s, progress)


def _key(model_dir: Path, calib_ids: Any, heldout: str, cands: Sequence[Candidate],
         groups: Sequence[Group], ignore: Sequence[str]) -> str:  # fmt: skip
    import numpy as np

    from quantkit.quantize.vllm.auto.sensitivity import model_digest

    h = hashlib.sha256(f"quantkit-vllm-auto-select {CACHE_VERSION}".encode())
    h.update(model_digest(model_dir).encode())
    h.update(np.ascontiguousarray(calib_ids, dtype=np.int64).tobytes())
    h.update(hashlib.sha256(heldout.encode()).digest())
    h.update(f"chunks={SELECT_CHUNKS};ctx={SELECT_CTX};ignore={sorted(ignore)}".encode())
    for c in cands:
        h.update(json.dumps([c.name, mixed_target(c.plan, groups).to_recipe()],
                            sort_keys=True).encode())  # fmt: skip
    return h.hexdigest()[:32]


def unrunnable(c: Candidate) -> str | None:
    """Why this host's vLLM cannot run candidate ``c`` (its measured capability matrix, as
    host.py reads it), or None. A scheme kept by ``:force`` may be one it cannot run."""
    from quantkit.quantize.vllm.auto.host import DTYPE_ROW
    from quantkit.validate import capabilities

    short = DTYPE_ROW.get(c.plan.dtype)
    verdicts = capabilities.load("vllm")
    for name in sorted({x.scheme for x in c.plan.choices}):
        s = scheme(name)
        if s is None or s.kind == "float" or short is None:
            continue
        v = verdicts.get(s.capability_row(short))
        if v is not None and not (v.runs or v.fix):
            return f"this host's vLLM cannot run {name}: {v.reason} (capability row {v.row})"
    return None


def measure(model_dir: Path, cands: list[Candidate], groups: Sequence[Group], settings: Any,
            progress: Progress | None = None, use_cache: bool = True) -> Selection:  # fmt: skip
    """Export and score every candidate this host's vLLM runs on the held-out chunks (cached by
    content); the others keep the reason in ``error``."""
    from quantkit.atomic import cached_json
    from quantkit.paths import vllm_sensitivity_dir
    from quantkit.quantize.vllm.calibration import calibration_ids

    for c in cands:
        c.error = unrunnable(c)
    todo = [c for c in cands if c.error is None]
    if not todo:
        return Selection(cands, notes=["no candidate can be scored in this host's vLLM"])
    rest = heldout_text(model_dir, settings.calib, settings.samples, settings.seq_len)
    if not rest:
        raise InputError(
            f"{settings.calib}: nothing of the calibration text is left after the "
            f"{settings.samples} × {settings.seq_len} tokens it calibrates on, for the held-out "
            "chunks gptq:auto selects on",
            f"pass a longer --calib (about {SELECT_CHUNKS * SELECT_CTX} tokens more)",
        )
    ids = calibration_ids(model_dir, settings.calib, settings.samples, settings.seq_len)
    key = _key(model_dir, ids, rest, todo, groups, settings.ignore)

    def make() -> dict[str, Any]:
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="quantkit-select-") as tmp:
            work = Path(tmp)
            (work / "heldout.txt").write_text(rest)
            step = progress or (lambda *_: None)
            step("selection: export", 0, len(todo))
            folders = export_candidates(model_dir, todo, groups, settings, work / "out",
                                        progress)  # fmt: skip
            step("selection: export", len(todo), len(todo))
            step("selection: score", 0, len(todo))
            rep = score(model_dir, folders, work / "heldout.txt", SELECT_CHUNKS,
                        settings.threads, progress)  # fmt: skip
            step("selection: score", len(todo), len(todo))
        by_path = {e["path"]: e for e in rep["artifacts"]}
        got = {}
        for name, p in folders.items():
            e = by_path[str(p)]
            q = e.get("quality") or {}
            got[name] = {"kld": q.get("kld_mean"), "top1": q.get("top1_pct"),
                         "error": None if e["status"] == "ok" else f"{e['status']}: {e.get('error')}"}  # fmt: skip
        return {"scores": got, "chunks": rep["data"]["chunks"],
                "tokens": rep["data"]["scored_tokens"], "seconds": time.perf_counter() - t0}  # fmt: skip

    root = vllm_sensitivity_dir().parent / "vllm-auto-select"
    d, hit = cached_json(root / f"{key}.json", make, use_cache=use_cache)
    for c in todo:
        sc = d["scores"][c.name]
        c.measured_kld, c.top1_pct, c.error = sc["kld"], sc["top1"], sc["error"]
    return Selection(cands, d["chunks"], d["tokens"], d["seconds"], hit)


def select(model_dir: Path, plan: AutoPlan, groups: Sequence[Group], settings: Any,
           progress: Progress | None = None) -> tuple[MixedTarget, Selection]:  # fmt: skip
    """The measured-best candidate as the target to write, and the selection behind it."""
    cands = candidates(plan, groups)
    sel = measure(model_dir, cands, groups, settings, progress)
    w = sel.winner
    if w is None:  # nothing measurable here (e.g. a :force plan for another server)
        w = next(c for c in cands if c.source == "solver")
        sel.unmeasured = w.name
        sel.notes.append(f"none measured ({'; '.join(f'{c.name}: {c.error}' for c in cands)}): "
                         f"{w.name} ships unmeasured")  # fmt: skip
    t = candidate_target(w, groups, label=False)
    plan_json = {**t.plan_json, "selection": sel.to_json()}
    return t.model_copy(update={"plan_json": plan_json}), sel


def dry_run(plan: AutoPlan, groups: Sequence[Group]) -> Selection:
    """The candidates a real run would measure, with their predictions only."""
    return Selection(candidates(plan, groups), dry_run=True,
                     notes=["dry run: candidates proposed, not exported or measured"])  # fmt: skip
