"""The vLLM target kinds (``gptq``, ``awq``, ``fp8``, ``int8``, ``nvfp4``, ``mxfp4``) and their
options; quantkit/targets.py
parses ``--to gptq:bits=4,group=64`` into them, as part of its one Target union.

Each method is a pydantic model that rejects unknown keys, so a typo fails before any work.
The models translate to llm-compressor's recipe arguments (``to_recipe``), which
``quantize/vllm/llmc_worker.py`` hands to ``oneshot`` in the llmcompressor environment.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

LAYOUTS = ("compressed-tensors", "legacy")
DEFAULT_IGNORE = ("lm_head",)
# MoE routers stay in float in every export (added to the ignore list of MoE models): vLLM 0.32
# builds Qwen2-MoE's shared_expert_gate with quant_config=None (models/qwen2_moe.py), so a
# quantized one would not load, and a router's few weights decide which experts run: quantization
# noise there flips routing for little size gain. transformers 5 module names: ``mlp.gate``
# (Mixtral, Qwen2-MoE, Qwen3-MoE) and ``mlp.shared_expert_gate`` (Qwen2-MoE).
MOE_ROUTER_IGNORE = ("re:.*mlp\\.gate$", "re:.*mlp\\.shared_expert_gate$")
# The experts as llm-compressor names them once linearized (``mlp.experts.E.gate_proj`` …).
MOE_EXPERTS_IGNORE = "re:.*mlp\\.experts\\..*"

# FP8 block-wise weights: llm-compressor's FP8_BLOCK preset (compressed-tensors
# quantization/quant_scheme.py) uses 128×128 weight blocks and 1×128 activation groups.
FP8_BLOCK = 128


def int_weights_args(
    bits: int, group: int | None, *, sym: bool = True, actorder: str = "none"
) -> dict[str, Any]:
    """compressed-tensors QuantizationArgs of W{bits}A16 integer weights: one scale per
    ``group`` input columns (None: one per output channel), symmetric or with a zero point;
    ``actorder`` (GPTQ's activation ordering) applies to groups only."""
    args: dict[str, Any] = {
        "num_bits": bits,
        "type": "int",
        "symmetric": sym,
        "strategy": "group" if group else "channel",
    }
    if group:
        args["group_size"] = group
        if actorder != "none":
            args["actorder"] = actorder
    return args


def _group(v: Any) -> int | None:
    """``group=channel`` (or -1) means one scale per output channel (no groups)."""
    if isinstance(v, str) and v.lower() in ("channel", "per-channel", "-1", "none"):
        return None
    if v == -1:
        return None
    return int(v)


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # quantkit/targets.py's grammar and dispatch read these: the builder family (one
    # llm-compressor run for every vLLM target), the option a bare word sets, a hint
    family: ClassVar[str] = "vllm"
    bare: ClassVar[str | None] = None
    hint: ClassVar[str | None] = None

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def group_size(self) -> int | None:
        return getattr(self, "group", None)

    def label(self) -> str:
        """Short name used in output folder names, e.g. ``gptq-w4g64``."""
        raise NotImplementedError


class _IntWeights(_Target):
    bits: Literal[4, 8] = 4
    group: Annotated[int | None, Field(description="32, 64, 128 or channel")] = 128
    sym: bool = True

    @field_validator("group", mode="before")
    @classmethod
    def _parse_group(cls, v: Any) -> int | None:
        g = _group(v)
        if g is not None and g not in (32, 64, 128):
            raise ValueError("group must be 32, 64, 128 or channel")
        return g

    def weights_args(self) -> dict[str, Any]:
        """compressed-tensors QuantizationArgs for the weights (W{bits}A16)."""
        return int_weights_args(self.bits, self.group, sym=self.sym)

    def label(self) -> str:
        g = f"g{self.group}" if self.group else "ch"
        return f"{self.method}-w{self.bits}{g}{'' if self.sym else '-asym'}"  # type: ignore[attr-defined]


class GPTQTarget(_IntWeights):
    method: Literal["gptq"] = "gptq"
    # Activation ordering (compressed-tensors ActivationOrdering): the columns are quantized in
    # order of decreasing activation importance; "weight" (alias "static") keeps the groups in
    # weight order, so the format and kernels are unchanged. compressed-tensors 0.19 (pinned by
    # llmcompressor 0.14.0.1) removed "group" ordering (the g_idx / desc_act layout).
    actorder: Literal["static", "weight", "none"] = "static"
    dampening: float = Field(0.01, gt=0, lt=1)  # fraction of the Hessian diagonal mean added

    def to_recipe(self) -> dict[str, Any]:
        return {
            "modifier": "GPTQModifier",
            "weights": int_weights_args(
                self.bits, self.group, sym=self.sym, actorder=self.actorder
            ),
            "kwargs": {"dampening_frac": self.dampening},
        }


class AWQTarget(_IntWeights):
    method: Literal["awq"] = "awq"
    sym: bool = False  # AWQ's usual scheme is asymmetric (W4A16_ASYM), as AutoAWQ wrote it
    duo_scaling: bool = True  # search scales from activations and weights (llm-compressor default)
    grid: int = Field(20, ge=1, le=100)  # scale candidates tried per mapping (AWQ n_grid)

    def to_recipe(self) -> dict[str, Any]:
        return {
            "modifier": "AWQModifier",
            "weights": self.weights_args(),
            "kwargs": {"duo_scaling": self.duo_scaling, "n_grid": self.grid},
        }


class FP8Target(_Target):
    bare: ClassVar[str | None] = "scheme"  # fp8:dynamic
    method: Literal["fp8"] = "fp8"
    # dynamic: FP8 weights per output channel, activations quantized per token at run time
    # (no calibration); static: per-tensor weights and activation scales from calibration;
    # block: 128×128 weight blocks, activations per 1×128 group at run time (no calibration).
    scheme: Literal["dynamic", "static", "block"] = "dynamic"
    # MoE experts: "auto" quantizes them where this host's vLLM has an FP8 fused-MoE kernel for
    # the scheme (CUDA; on CPU only fp8:block with AMX, see quantize/vllm/checks.py fp8_experts_problem)
    # and keeps them in float elsewhere (with a note), so the export loads where it was made.
    experts: Literal["auto", "fp8", "float"] = "auto"

    @property
    def needs_calibration(self) -> bool:
        return self.scheme == "static"

    @property
    def group_size(self) -> int | None:
        return FP8_BLOCK if self.scheme == "block" else None

    def to_recipe(self) -> dict[str, Any]:
        preset = {"dynamic": "FP8_DYNAMIC", "static": "FP8", "block": "FP8_BLOCK"}[self.scheme]
        return {"modifier": "QuantizationModifier", "preset": preset, "kwargs": {}}

    def label(self) -> str:
        return f"fp8-{self.scheme}"


# INT8 W8A8 (compressed-tensors' W8A8 preset): int8 weights with one scale per output channel,
# int8 activations with one scale per token computed at run time; ``static``: one activation
# scale per tensor from calibration instead. The weights get GPTQ after SmoothQuant, which moves
# activation outliers into the weights (x·W = (x/s)·(sW), s_j = max|x_j|^α / max|W_j|^(1-α)),
# so that per-token int8 activations lose little. α (``smoothing``) 0.8 as llm-compressor's W8A8
# INT8 example (examples/quantization_w8a8_int8/llama3_example.py); 0 skips SmoothQuant.
INT8_WEIGHTS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "channel"}
INT8_ACTIVATIONS = {
    "dynamic": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                "dynamic": True},
    "static": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "tensor",
               "dynamic": False},
}  # fmt: skip


class Int8Target(_Target):
    bare: ClassVar[str | None] = "activations"  # int8:static
    method: Literal["int8"] = "int8"
    activations: Literal["dynamic", "static"] = "dynamic"
    smoothing: float = Field(0.8, ge=0, lt=1)  # SmoothQuant strength α; 0: no SmoothQuant
    dampening: float = Field(0.01, gt=0, lt=1)  # GPTQ: fraction of the Hessian diagonal mean

    def to_recipe(self) -> dict[str, Any]:
        return {
            "modifier": "GPTQModifier",
            "weights": dict(INT8_WEIGHTS),
            "activations": dict(INT8_ACTIVATIONS[self.activations]),
            "smoothing": self.smoothing,
            "kwargs": {"dampening_frac": self.dampening},
        }

    def label(self) -> str:
        return "w8a8-int8" + ("-static" if self.activations == "static" else "")


class FP4Target(_Target):
    """4-bit float (E2M1) weights, llm-compressor's presets (compressed-tensors quant_scheme.py):
    NVFP4 = a FP8 (E4M3) scale per 16 values and a float32 scale per tensor; MXFP4 = a power-of-two
    (E8M0) scale per 32 values. ``fp4``: activations in the same format too (NVFP4: per-16 scales
    at run time under a per-tensor scale from calibration; MXFP4: per-32 at run time); ``a16``:
    weights only (W4A16), no calibration."""

    bare: ClassVar[str | None] = "activations"  # nvfp4:a16
    method: Literal["nvfp4", "mxfp4"]
    activations: Literal["fp4", "a16"] = "fp4"

    @property
    def needs_calibration(self) -> bool:
        # NVFP4 activations need their per-tensor global scale observed (static_minmax observer)
        return self.method == "nvfp4" and self.activations == "fp4"

    @property
    def group_size(self) -> int | None:
        return 16 if self.method == "nvfp4" else 32

    def to_recipe(self) -> dict[str, Any]:
        preset = self.method.upper() + ("A16" if self.activations == "a16" else "")
        return {"modifier": "QuantizationModifier", "preset": preset, "kwargs": {}}

    def label(self) -> str:
        return self.method + ("-a16" if self.activations == "a16" else "")


VllmTarget = GPTQTarget | AWQTarget | FP8Target | Int8Target | FP4Target
