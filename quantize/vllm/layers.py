"""The Linear layers a vLLM export quantizes: found from safetensors headers (or the model
built on the meta device), matched against --ignore, named compactly in messages."""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.checkpoint import Checkpoint
from quantkit.errors import InputError

MOE_CONFIG_KEYS = ("num_experts", "num_local_experts")  # Qwen2/3-MoE, Mixtral


def is_moe(config: dict[str, Any]) -> bool:
    return any(int(config.get(k) or 0) > 1 for k in MOE_CONFIG_KEYS)


@dataclass
class LinearLayer:
    name: str
    in_features: int
    out_features: int


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
