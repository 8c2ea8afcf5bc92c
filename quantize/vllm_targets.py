"""vLLM targets of ``quantkit convert --to``: ``gptq``, ``awq``, ``fp8`` with options.

A target is ``METHOD[:OPTIONS]`` where OPTIONS is a comma-separated list of ``key=value``
(``gptq:bits=4,group=64,actorder=group``); for fp8 a bare word is the scheme (``fp8:block``).
Each method is a pydantic model that rejects unknown keys, so a typo fails before any work.
The models translate to llm-compressor's recipe arguments (``to_recipe``), which
``quantize/llmc_worker.py`` hands to ``oneshot`` in the llmcompressor environment.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from quantkit.errors import InputError

METHODS = ("gptq", "awq", "fp8")
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


def _group(v: Any) -> int | None:
    """``group=channel`` (or -1) means one scale per output channel (no groups)."""
    if isinstance(v, str) and v.lower() in ("channel", "per-channel", "-1", "none"):
        return None
    if v == -1:
        return None
    return int(v)


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

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
        args: dict[str, Any] = {
            "num_bits": self.bits,
            "type": "int",
            "symmetric": self.sym,
            "strategy": "group" if self.group else "channel",
        }
        if self.group:
            args["group_size"] = self.group
        return args

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
        w = self.weights_args()
        if self.actorder != "none" and self.group:
            w["actorder"] = self.actorder
        return {
            "modifier": "GPTQModifier",
            "weights": w,
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
    method: Literal["fp8"] = "fp8"
    # dynamic: FP8 weights per output channel, activations quantized per token at run time
    # (no calibration); static: per-tensor weights and activation scales from calibration;
    # block: 128×128 weight blocks, activations per 1×128 group at run time (no calibration).
    scheme: Literal["dynamic", "static", "block"] = "dynamic"
    # MoE experts: "auto" quantizes them where this host's vLLM has an FP8 fused-MoE kernel for
    # the scheme (CUDA; on CPU only fp8:block with AMX, see quantize/vllm.py fp8_experts_problem)
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


VllmTarget = GPTQTarget | AWQTarget | FP8Target
_MODELS: dict[str, type[_Target]] = {"gptq": GPTQTarget, "awq": AWQTarget, "fp8": FP8Target}
# A bare word after the colon: which option it sets.
_BARE: dict[str, str] = {"fp8": "scheme"}


# Methods users ask for that vLLM 0.32 cannot load, refused when the target is parsed: name ->
# (why, what to use instead). vLLM 0.32 has no bitsandbytes quantization method (its
# ``QuantizationMethods`` in vllm/model_executor/layers/quantization/__init__.py lists awq, gptq,
# fp8, compressed-tensors, modelopt, mxfp4, torchao, ...; online shorthands such as
# ``fp8_per_channel`` and ``int8_per_channel_weight_only`` took its place).
_NO_BNB = (
    "vLLM 0.32 has no bitsandbytes quantization method any more, so a bitsandbytes checkpoint "
    "would not load",
    "use --to gptq or --to awq for 4-bit weights, --to fp8 for 8-bit (all load in vLLM)",
)
REFUSED_METHODS: dict[str, tuple[str, str]] = {"bnb": _NO_BNB, "bitsandbytes": _NO_BNB}


def is_vllm_target(spec: str) -> bool:
    """Whether ``spec`` names a vLLM method; a method vLLM cannot load is refused here."""
    method = spec.partition(":")[0].strip().lower()
    _refuse(spec, method)
    return method in METHODS


def _refuse(spec: str, method: str) -> None:
    if method in REFUSED_METHODS:
        why, instead = REFUSED_METHODS[method]
        raise InputError(f"--to {spec}: {why}", instead)


def parse_vllm_target(spec: str) -> VllmTarget:
    """``gptq:bits=4,group=64`` → GPTQTarget(bits=4, group=64). InputError on anything unknown.
    ``gptq:auto:bits=4.5`` → a VllmAutoSpec (quantize/vllm_auto/spec.py), planned at export."""
    from quantkit.quantize.vllm_auto.spec import is_vllm_auto, parse_vllm_auto

    if is_vllm_auto(spec):
        return parse_vllm_auto(spec)  # type: ignore[return-value]
    method, _, rest = spec.partition(":")
    method = method.strip().lower()
    _refuse(spec, method)
    model = _MODELS.get(method)
    if model is None:
        raise InputError(f"unknown target {spec!r}", f"vLLM targets are {', '.join(METHODS)}")
    opts: dict[str, Any] = {}
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        if not eq:
            if method not in _BARE:
                raise InputError(
                    f"{spec!r}: option {item!r} has no value",
                    f"write options as key=value, e.g. {method}:bits=4,group=64",
                )
            key, value = _BARE[method], item
        if key == "method":
            raise InputError(f"{spec!r}: 'method' is not an option")
        opts[key] = _coerce(value.strip())
    try:
        return model(**opts)  # type: ignore[return-value]
    except ValidationError as e:
        raise InputError(f"{spec!r}: {_first_error(e)}", _options_hint(model)) from None


def _coerce(v: str) -> Any:
    low = v.lower()
    if low in ("true", "yes", "on"):
        return True
    if low in ("false", "no", "off"):
        return False
    for kind in (int, float):  # Literal[4, 8] needs an int, not "8"
        try:
            return kind(v)
        except ValueError:
            pass
    return v


def _first_error(e: ValidationError) -> str:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"]) or "options"
    if err["type"] == "extra_forbidden":
        return f"unknown option {loc!r}"
    return f"{loc}: {err['msg']}"


def _options_hint(model: type[_Target]) -> str:
    opts = []
    for name, f in model.model_fields.items():
        if name == "method":
            continue
        ann = f.annotation
        choices = getattr(ann, "__args__", None)
        if name == "group":
            opts.append("group=32|64|128|channel")
        elif choices and all(isinstance(c, (str, int)) for c in choices):
            opts.append(f"{name}={'|'.join(str(c) for c in choices)}")
        else:
            opts.append(f"{name}=…")
    method = model.model_fields["method"].default
    return f"{method} options: {', '.join(opts)}"
