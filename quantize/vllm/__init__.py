"""HF checkpoint → vLLM checkpoint (GPTQ, AWQ, FP8, gptq:auto mixes) through llm-compressor.

targets.py      the target kinds and their llm-compressor recipes
settings.py     how one export runs (ignore list, layouts, calibration, limits)
layers.py       the Linear layers found, --ignore matching
checks.py       every cheap check before a weight is loaded (widths, AWQ mappings, MoE, memory)
calibration.py  calibration token windows
export.py       the llm-compressor worker run, completing and placing each checkpoint
legacy.py       the gptq / awq layouts AutoGPTQ / AutoAWQ wrote, repacked from compressed-tensors
llmc_worker.py  the script run in the llmcompressor environment (no quantkit import)
auto/           gptq:auto: per-group schemes at an average bit width
"""

from __future__ import annotations

import importlib
from typing import Any

# name -> submodule, imported on first use: quantkit/targets.py reads the target models without
# loading the export machinery
_WHERE = {
    "calibration": ("calibration_ids", "tokenize_calibration"),
    "export": (
        "VLLM_EXPERTS_IGNORE", "VllmArtifact", "VllmResult", "complete_checkpoint", "export_vllm",
        "llmc_python", "export_placed",
    ),
    "layers": (
        "HEADER_LAYOUT_TYPES", "LinearLayer", "expand_names", "ignored", "is_moe",
        "layers_from_headers", "linear_layers", "meta_linear_layers",
    ),
    "checks": (
        "Plan", "PreflightError", "awq_mappings", "fp8_experts_problem", "memory_estimate",
        "preflight", "target_ignore",
    ),
    "settings": ("VllmSettings",),
    "targets": ("DEFAULT_IGNORE",),
}  # fmt: skip
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name in _MODULE:
        return getattr(importlib.import_module(f"{__name__}.{_MODULE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
