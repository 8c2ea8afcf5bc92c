"""``gptq:auto``: the plan (sensitivity → knapsack over exact bits) and the target it becomes.

The plan names a scheme for every fused group (groups.py) of the Linears that a uniform
export would quantize; the solver is quantize/gguf/auto/solver.py (multiple-choice knapsack, cost =
exact bits of the stored tensors, value = predicted KLD). The plan becomes a ``MixedTarget``:
one compressed-tensors config group per scheme, whose ``targets`` are anchored regular
expressions over the layer index, and the float groups in ``ignore``. llm-compressor's
GPTQModifier quantizes every group (int and FP8 weights alike) and writes the
``mixed-precision`` checkpoint; quantize/vllm/export.py runs it like any other target.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import InputError
from quantkit.quantize.gguf.auto.solver import BudgetTooSmall, Option, solve
from quantkit.quantize.vllm.auto.groups import FUSED, Group, fused_groups
from quantkit.quantize.vllm.auto.schemes import Scheme, scheme
from quantkit.quantize.vllm.auto.sensitivity import Sensitivity, measure
from quantkit.quantize.vllm.auto.spec import VllmAutoSpec
from quantkit.quantize.vllm.targets import GPTQTarget

Progress = Callable[[str, int, int], None]
DTYPE_BITS = {"float32": 32, "float16": 16, "bfloat16": 16}


@dataclass
class GroupChoice:
    group: str
    kind: str
    scheme: str
    bits: float  # average bits per weight of the group in that scheme
    weights: int
    predicted_kld: float


@dataclass
class AutoPlan:
    spec: VllmAutoSpec
    choices: list[GroupChoice]
    cost_bits: int  # exact bits of the planned Linears' stored tensors
    weights: int  # their weight count
    budget_bits: int
    dtype: str
    candidates: list[str]
    notes: list[str] = field(default_factory=list)
    sensitivity: Sensitivity | None = None

    @property
    def bits(self) -> float:
        return self.cost_bits / self.weights

    @property
    def predicted_kld(self) -> float:
        return sum(c.predicted_kld for c in self.choices)

    def members(self, groups: Sequence[Group]) -> dict[str, list[str]]:
        """scheme -> module names (in layer order)."""
        by_group = {g.name: g for g in groups}
        out: dict[str, list[str]] = {}
        for c in self.choices:
            out.setdefault(c.scheme, []).extend(m.name for m in by_group[c.group].members)
        return out

    def to_json(self) -> dict[str, Any]:
        s = self.sensitivity
        return {
            "bits_asked": self.spec.bits,
            "predicted_bits": round(self.bits, 4),
            "predicted_kld": self.predicted_kld,
            "weights": self.weights,
            "candidates": self.candidates,
            "histogram": dict(Counter(c.scheme for c in self.choices).most_common()),
            "groups": [c.__dict__ for c in self.choices],
            "notes": self.notes,
            **(
                {
                    "sensitivity": {
                        "cache_hit": s.cache_hit,
                        "gains": s.gains,
                        "probe_kld": s.probe_kld,
                        "seconds": s.seconds,
                    }
                }  # fmt: skip
                if s is not None
                else {}
            ),
        }


class MixedTarget(GPTQTarget):
    """A planned ``gptq:auto``: GPTQ over several config groups (GPTQTarget for what the
    preflight and memory model know of GPTQ)."""

    auto: VllmAutoSpec
    config_groups: dict[str, Any]
    float_layers: tuple[str, ...] = ()
    plan_json: dict[str, Any] = {}
    candidate: str | None = None  # select.py: a candidate measured before one ships

    @property
    def group_size(self) -> int | None:
        return None  # each group's size divides its layers by construction (Group.fits)

    def __hash__(self) -> int:  # its dict fields keep pydantic's frozen hash from working
        return hash((self.label(), json.dumps(self.config_groups, sort_keys=True),
                     self.float_layers))  # fmt: skip

    def label(self) -> str:
        return self.auto.label() + (f"-{self.candidate}" if self.candidate else "")

    def to_recipe(self) -> dict[str, Any]:
        return {
            "modifier": "GPTQModifier",
            "config_groups": self.config_groups,
            "kwargs": {"dampening_frac": self.auto.dampening},
        }


# -- the groups and their options ----------------------------------------------------------------


def planned_groups(model_dir: Path, ignore: Sequence[str]) -> tuple[list[Group], str]:
    """The fused groups of the Linears a uniform export would quantize, and the checkpoint's
    dtype. Refuses MoE models and ignore lists that split a fused layer."""
    from quantkit.checkpoint import Checkpoint
    from quantkit.quantize.vllm import ignored, is_moe, linear_layers

    with Checkpoint.open(model_dir) as ck:
        config = ck.config
    if is_moe(config):
        raise InputError(
            "gptq:auto plans dense models; this one has MoE experts",
            "use a uniform target (--to gptq or --to fp8)",
        )
    _, layers, _ = linear_layers(model_dir)
    todo = [(x.name, x.in_features, x.out_features) for x in layers if not ignored(x.name, ignore)]
    if not todo:
        raise InputError(f"--ignore leaves no Linear layer to quantize in {model_dir}")
    groups = fused_groups(todo)
    present = {x.name for x in layers}
    split = [
        g.name
        for g in groups
        if g.kind in FUSED
        and any(f"{g.name.rpartition('.')[0]}.{s}" in present for s in FUSED[g.kind])
        and len(g.members) != len(FUSED[g.kind])
    ]
    if split:
        raise InputError(
            f"--ignore leaves part of {len(split)} fused layer(s) quantized, e.g. {split[0]}: "
            "vLLM needs one scheme for every shard of a fused layer",
            "ignore all of q/k/v_proj (or gate/up_proj) of a layer, or none",
        )
    dtype = str(config.get("dtype") or config.get("torch_dtype") or "bfloat16")
    return groups, dtype


def group_options(groups: Sequence[Group], candidates: Sequence[Scheme]) -> dict[str, list[Scheme]]:
    """Per group, the candidates whose group size divides every member's input width; refuses
    when a group is left with none."""
    opts = {g.name: [s for s in candidates if g.fits(s)] for g in groups}
    empty = [g for g in groups if not opts[g.name]]
    if empty:
        widths = sorted({m.in_features for g in empty for m in g.members})
        raise InputError(
            f"no candidate scheme fits {len(empty)} group(s), e.g. {empty[0].name} (input widths "
            f"{', '.join(map(str, widths))}; group sizes must divide them)",
            "add a smaller group (w4g32) or float to types=",
        )
    return opts


def choose(
    spec: VllmAutoSpec, groups: Sequence[Group], options: dict[str, list[Scheme]],
    sens: Sensitivity, dtype_bits: int,
) -> tuple[list[GroupChoice], int, int, int]:  # fmt: skip
    """The knapsack: (choices, cost bits, weights, budget bits)."""
    weights = sum(g.weights for g in groups)
    budget = math.floor(spec.bits * weights)
    table = {
        g.name: [Option(s.name, g.cost_bits(s, dtype_bits), sens.kld(g, s.name))
                 for s in options[g.name]]
        for g in groups
    }  # fmt: skip
    try:
        sol = solve(table, budget)
    except BudgetTooSmall as e:
        raise InputError(
            f"{spec.label()}: {spec.bits:g} bits per weight is below the smallest mix of the "
            f"candidates, {e.smallest / weights:.3f}",
            f"ask for bits={math.ceil(e.smallest / weights * 100) / 100:g} or more, or add "
            "smaller schemes to types=",
        ) from None
    out = []
    for g in groups:
        o = sol.choice[g.name]
        out.append(GroupChoice(g.name, g.kind, o.type, o.cost / g.weights, g.weights, o.kld))
    return out, sol.cost, weights, budget


def make_plan(
    model_dir: Path,
    spec: VllmAutoSpec,
    *,
    ignore: Sequence[str],
    calib: Path | None,
    samples: int,
    seq_len: int,
    threads: int | None = None,
    progress: Progress | None = None,
    say: Callable[[str], None] | None = None,
) -> tuple[AutoPlan, list[Group]]:
    """Everything up to the choice of schemes (no llm-compressor, no file written)."""
    from quantkit.quantize.vllm import calibration_ids
    from quantkit.quantize.vllm.auto.host import runnable

    if calib is None:
        raise InputError(
            f"{spec.label()} needs calibration text (its sensitivity and GPTQ)",
            "pass --calib FILE (plain text, disjoint from what you evaluate on)",
        )
    groups, dtype = planned_groups(model_dir, ignore)
    cands = runnable(spec, dtype, say)
    options = group_options(groups, cands.schemes)
    ids = calibration_ids(model_dir, calib, samples, seq_len)
    sens = measure(model_dir, groups, options, ids, dtype=dtype, threads=threads,
                   progress=progress)  # fmt: skip
    choices, cost, weights, budget = choose(spec, groups, options, sens, DTYPE_BITS.get(dtype, 16))
    plan = AutoPlan(spec, choices, cost, weights, budget, dtype,
                    [s.name for s in cands.schemes], cands.notes, sens)  # fmt: skip
    return plan, groups


# -- the plan as compressed-tensors config groups -----------------------------------------------

_INDEXED = re.compile(r"^(.*?\.)(\d+)\.(.*)$")


def targets(names: Sequence[str]) -> list[str]:
    """Module names → anchored ``re:`` patterns, one per name shape with the layer indices as
    an alternation (``re:^model\\.layers\\.(0|7)\\.mlp\\.down_proj$``); names without an index
    stay exact. compressed-tensors and vLLM both match ``re:`` targets with ``re.match``."""
    shapes: dict[tuple[str, str], list[str]] = {}
    exact: list[str] = []
    for n in names:
        m = _INDEXED.match(n)
        if m:
            shapes.setdefault((m.group(1), m.group(3)), []).append(m.group(2))
        else:
            exact.append(n)
    out = [
        f"re:^{re.escape(head)}({'|'.join(idx)})\\.{re.escape(tail)}$"
        for (head, tail), idx in shapes.items()
    ]
    return out + exact


def config_groups(members: dict[str, list[str]]) -> tuple[dict[str, Any], list[str]]:
    """scheme -> module names → (compressed-tensors config_groups, float module names).

    Int schemes come first, fewest bits first: validate/capabilities.py reads a checkpoint's
    format from its first config group, and the W4A16 row is the one that carries a dtype fix
    (vLLM's CPU int4 kernel takes 16-bit activations only)."""
    order = sorted(
        (scheme(n) for n in members if n != "float"),
        key=lambda s: (s.kind != "int", s.bits, -(s.group or 0)),  # type: ignore[union-attr]
    )
    groups: dict[str, Any] = {}
    for i, s in enumerate(order):
        assert s is not None
        g: dict[str, Any] = {"targets": targets(members[s.name]), "weights": s.weights_args()}
        if (a := s.activation_args()) is not None:
            g["input_activations"] = a
        groups[f"group_{i}"] = g
    return groups, list(members.get("float", []))


def mixed_target(plan: AutoPlan, groups: Sequence[Group]) -> MixedTarget:
    cg, floats = config_groups(plan.members(groups))
    if not cg:
        raise InputError(
            f"{plan.spec.label()}: the plan leaves every layer in float",
            "lower bits= or use --to hf",
        )
    return MixedTarget(auto=plan.spec, config_groups=cg, float_layers=tuple(floats),
                       plan_json={**plan.to_json(), "modules": plan.members(groups)})  # fmt: skip


# -- the written checkpoint ----------------------------------------------------------------------


def stored_bits(checkpoint: Path, modules: Sequence[str]) -> int:
    """Bits ``modules`` take in a written checkpoint, from its safetensors headers: every
    tensor of each module (packed weights, scales, shapes) counts."""
    from quantkit.checkpoint import Checkpoint

    wanted = set(modules)
    with Checkpoint.open(checkpoint) as ck:
        return sum(t.nbytes * 8 for n, t in ck.tensors.items() if n.rpartition(".")[0] in wanted)


def actual_bits(checkpoint: Path, plan_json: dict[str, Any]) -> float:
    """Average stored bits per weight of the planned Linears in the written checkpoint."""
    modules = [m for g in plan_json["modules"].values() for m in g]
    return stored_bits(checkpoint, modules) / plan_json["weights"]


def resolve(
    model_dir: Path, parsed: Sequence[Any], settings: Any, progress: Progress | None = None
) -> tuple[list[Any], list[str]]:
    """quantize/vllm/export.py's hook: every VllmAutoSpec of ``parsed`` planned into a MixedTarget;
    returns the targets and the notes to print."""
    out, notes = [], []
    for t in parsed:
        if not isinstance(t, VllmAutoSpec):
            out.append(t)
            continue
        if "legacy" in settings.layouts:
            raise InputError(
                f"{t.label()} has no legacy layout (the gptq format holds one scheme)",
                "write it as compressed-tensors (the default --layout)",
            )
        from quantkit.quantize.vllm.auto.select import select

        plan, groups = make_plan(model_dir, t, ignore=settings.ignore, calib=settings.calib,
                                 samples=settings.samples, seq_len=settings.seq_len,
                                 threads=settings.threads, progress=progress)  # fmt: skip
        notes += [f"{t.label()}: {n}" for n in plan.notes]
        target, sel = select(model_dir, plan, groups, settings, progress)
        p = target.plan_json
        hist = ", ".join(f"{k} ×{v}" for k, v in p["histogram"].items())
        notes.append(f"{t.label()}: {selection_line(p['selection'])}")
        notes.append(
            f"{t.label()}: {len(p['groups'])} groups ({hist}); predicted {p['predicted_bits']:.3f} "
            f"bits per weight ({t.bits:g} asked), predicted KLD {p['predicted_kld']:.4g}"
        )
        out.append(target)
    return out, notes


def selection_line(sel: dict[str, Any]) -> str:
    """select.py's JSON in one line: what was measured, what won and by how much."""
    if sel.get("dry_run"):
        return (f"dry run: {len(sel['candidates'])} candidates proposed "
                f"({', '.join(c['name'] for c in sel['candidates'])}), none measured")  # fmt: skip
    kld = {c["name"]: c["measured_kld"] for c in sel["candidates"]}
    ref = sel.get("best_reference")
    vs = (f", {100 * sel['margin']:+.1f} % against {ref} ({kld[ref]:.4g})"
          if ref and sel.get("margin") is not None else "")  # fmt: skip
    return (
        f"{len(sel['candidates'])} candidates measured in vLLM on {sel['chunks']} held-out "
        f"calibration chunks ({sel['tokens']} tokens, {sel['seconds']:.0f} s"
        f"{', cached' if sel.get('cache_hit') else ''}): "
        + ", ".join(f"{n} {v:.4g}" if v is not None else f"{n} failed" for n, v in kld.items())
        + f"; ships {sel['winner']}{vs}"
    )
