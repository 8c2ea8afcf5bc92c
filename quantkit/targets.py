"""What an export makes: one validated model per target kind, shared by the CLI's ``--to``,
``quantkit.export`` and recipes.

The grammar (``parse_target``; case-insensitive; options are ``key=value`` separated by commas,
one bare word where a kind has a main option):

    gguf:TYPE  (or bare TYPE)      a llama.cpp file type: F16, BF16, Q8_0, Q4_K_M, IQ4_XS, ...
    gguf:auto:size=N|bpw=X[:types=Q4_K,Q5_K,...]
                                   the per-tensor mix of least predicted KLD in that budget
    gguf-lora / vllm-lora          the fine-tune's adapter itself (needs an adapter)
    gptq[:bits=4|8,group=32|64|128|channel,sym=…,actorder=static|weight|none,dampening=0.01]
    gptq:auto:bits=X[:types=w4g64,fp8,float,...]
                                   a per-layer mix of schemes at an average bit width
    awq[:bits,group,sym,duo_scaling,grid]
    fp8[:dynamic|static|block]     vLLM checkpoints (compressed-tensors, via llm-compressor)
    int8[:dynamic|static][,smoothing=0.8,dampening=0.01]
                                   INT8 W8A8: SmoothQuant + GPTQ, per-channel weights
    nvfp4[:a16], mxfp4[:a16]       FP4 weights (and activations unless a16)
    hf[:bf16|f16|f32][,shard=5GB]  a plain HF checkpoint folder (hf:shard=2GB without a dtype)

This module is the only ``--to`` grammar: ``KIND[:SECTION]...``, sections separated by ``:``,
items in a section by ``,``; an item is ``key=value``, a bare word as a kind's first item sets
its main option (a model's ``bare``: a GGUF type, an fp8 scheme, an hf dtype), a bare word naming
a boolean option sets it (``force``), and a bare word after a list option continues the list
(``types=Q4_K,Q5_K``). ``KIND:auto`` is the kind ``KIND-auto`` where one exists (gptq:auto).

A recipe writes the same fields as YAML (``method: gptq`` and its options). Each kind is one
model in the ``Target`` union that names the builder family that makes it (``family``: the GGUF
converter, llm-compressor, or the HF checkpoint writer; quantkit/pipeline/build.py maps a family
to its builder); the kinds, their families and their option hints are read off the models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Annotated, Any, ClassVar, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator

from quantkit.errors import InputError
from quantkit.quantize.vllm.auto.spec import VllmAutoSpec
from quantkit.quantize.vllm.targets import (
    AWQTarget,
    FP4Target,
    FP8Target,
    GPTQTarget,
    Int8Target,
)

# vLLM calibration defaults of convert and quantkit.export, chosen with bench/vllm_export.py on a
# 2-core CPU so that the embedded default (SmolLM2-135M, 30 layers) exports in minutes
# (docs/cli.md gives the quality they cost). A recipe is a release job and defaults to 64
# samples of 512 tokens (quantkit/recipe.py Calibration), the scale of llm-compressor's examples;
# both are overridable (--samples/--seq-len; a recipe's calibration: section).
DEFAULT_SAMPLES = 16
DEFAULT_SEQ_LEN = 256
IMATRIX_CTX = 512  # llama-imatrix's default chunk size (tools/imatrix: n_ctx 512)


class _Target(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: ClassVar[str]  # the builder that makes it (quantkit/pipeline/build.py BUILDERS)
    bare: ClassVar[str | None] = None  # the option a bare first word sets (gguf:Q8_0, hf:bf16)
    hint: ClassVar[str | None] = None  # what to write, when the fields do not say it


class GGUFTarget(_Target):
    """A llama.cpp file, or ``type: auto`` with a size / bpw budget (gguf:auto)."""

    family: ClassVar[str] = "gguf"
    bare: ClassVar[str | None] = "type"
    hint: ClassVar[str | None] = (
        "write gguf:TYPE (`quantkit types` lists them) or gguf:auto:size=N|bpw=X "
        "(optionally :types=Q4_K,Q5_K,Q8_0)"
    )

    method: Literal["gguf"] = "gguf"
    type: str = Field(
        description="llama.cpp file type: F16, Q8_0, Q4_K_M, IQ4_XS, ...; or `auto` with `size` "
        "or `bpw`: the per-tensor mix of least predicted KLD in that budget (gguf:auto)"
    )
    imatrix: bool = Field(False, description="recipes: quantize with the calibration matrix")
    size: int | str | None = Field(None, description="type auto: file size budget (bytes, 100MB)")
    bpw: float | None = Field(None, gt=0, le=32, description="type auto: bits per weight budget")
    types: tuple[str, ...] | None = Field(None, description="type auto: candidate tensor types")
    overrides: tuple[str, ...] = Field((), description="PATTERN=TYPE per tensor")
    output_type: str | None = None
    embedding_type: str | None = None
    pure: bool = False
    leave_output: bool = False

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        from quantkit.quantize.gguf.types import GGUF_TYPES

        up = v.upper()
        if up != "AUTO" and up not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {v!r} (e.g. F16, Q8_0, Q4_K_M)")
        return up

    @field_validator("size", mode="before")
    @classmethod
    def _size(cls, v: Any) -> Any:
        from quantkit.quantize.gguf.auto.spec import parse_size

        v = _as_value_error(parse_size, v) if isinstance(v, str) else v
        if isinstance(v, int) and v <= 0:
            raise ValueError("size must be positive")
        return v

    @field_validator("types", mode="before")
    @classmethod
    def _types(cls, v: Any) -> Any:
        from quantkit.quantize.gguf.auto.spec import parse_types

        if isinstance(v, str):
            v = (v,)
        return None if v is None else _as_value_error(parse_types, ",".join(v))

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        from quantkit.quantize.gguf.quantizer import parse_overrides

        _as_value_error(parse_overrides, v)
        return v

    @field_validator("output_type", "embedding_type")
    @classmethod
    def _tensor_type(cls, v: str | None) -> str | None:
        from quantkit.quantize.gguf.quantizer import ggml_type

        if v is not None:
            _as_value_error(ggml_type, v)
        return v

    def model_post_init(self, __context: Any) -> None:
        if self.type != "AUTO":
            if self.size is not None or self.bpw is not None or self.types is not None:
                raise ValueError("size, bpw and types apply to type: auto")
        elif (self.size is None) == (self.bpw is None):
            which = "both size and bpw" if self.size is not None else "neither size nor bpw"
            raise ValueError(f"gguf:auto needs exactly one budget, got {which}")

    @property
    def is_auto(self) -> bool:
        return self.type == "AUTO"

    @property
    def gguf_type(self) -> Any:
        """The file type's row of quantize/gguf/types.py (not for type auto)."""
        from quantkit.quantize.gguf.types import gguf_type

        return gguf_type(self.type)

    def auto_spec(self) -> Any:
        """The gguf:auto budget this target stands for (quantize/gguf/auto/spec.py): its
        fields, already validated here, not a second parse."""
        from quantkit.quantize.gguf.auto.spec import AutoSpec

        assert self.is_auto and (self.size is None or isinstance(self.size, int))
        return AutoSpec(size=self.size, bpw=self.bpw, types=self.types)

    def label(self) -> str:
        return self.auto_spec().name if self.is_auto else self.type


class AdapterTarget(_Target):
    """The fine-tune's adapter itself: a GGUF LoRA for llama.cpp, or a folder for vLLM."""

    family: ClassVar[str] = "gguf"  # written by the GGUF converter's one read of the adapter
    hint: ClassVar[str | None] = "gguf-lora and vllm-lora take no options"

    method: Literal["gguf-lora", "vllm-lora"]

    def label(self) -> str:
        return self.method


HF_DTYPES = {
    "bf16": "bf16", "bfloat16": "bf16",
    "fp16": "f16", "f16": "f16", "float16": "f16",
    "f32": "f32", "fp32": "f32", "float32": "f32",
}  # fmt: skip
# transformers' save_pretrained default max_shard_size ("5GB" = 5 * 10**9 bytes)
DEFAULT_SHARD_BYTES = 5 * 10**9


class HFTarget(_Target):
    """A plain HF checkpoint folder (safetensors shards, config, tokenizer)."""

    family: ClassVar[str] = "hf"
    bare: ClassVar[str | None] = "dtype"
    hint: ClassVar[str | None] = (
        "write hf, hf:bf16, hf:f16 or hf:f32, optionally with shard=SIZE (hf:bf16,shard=2GB)"
    )

    method: Literal["hf"] = "hf"
    dtype: Literal["bf16", "f16", "f32"] | None = Field(
        None, description="every floating tensor in this dtype (default: each keeps its own)"
    )
    shard: int = Field(DEFAULT_SHARD_BYTES, gt=0, description="bytes per safetensors shard")

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        return HF_DTYPES.get(v.lower(), v) if isinstance(v, str) else v

    @field_validator("shard", mode="before")
    @classmethod
    def _shard(cls, v: Any) -> Any:
        from quantkit.quantize.gguf.auto.spec import parse_size

        return _as_value_error(parse_size, v) if isinstance(v, str) else v

    def label(self) -> str:
        return f"hf-{self.dtype}" if self.dtype else "hf"


Target = Annotated[
    GGUFTarget
    | AdapterTarget
    | GPTQTarget
    | AWQTarget
    | FP8Target
    | Int8Target
    | FP4Target
    | VllmAutoSpec
    | HFTarget,
    Field(discriminator="method"),
]
_TARGET: TypeAdapter[Any] = TypeAdapter(Target)
# method -> its model, read off the union (a new kind is one model in it)
KINDS: dict[str, type[BaseModel]] = {
    m: model
    for model in get_args(get_args(Target)[0])
    for m in get_args(model.model_fields["method"].annotation)
}
METHODS = tuple(KINDS)

# Methods users ask for that vLLM 0.32 cannot load: name -> (why, what to use instead). vLLM 0.32
# has no bitsandbytes quantization method (its ``QuantizationMethods`` in
# vllm/model_executor/layers/quantization/__init__.py lists awq, gptq, fp8, compressed-tensors,
# modelopt, mxfp4, torchao, ...; online shorthands such as ``fp8_per_channel`` took its place).
_NO_BNB = (
    "vLLM 0.32 has no bitsandbytes quantization method, so a bitsandbytes checkpoint would not "
    "load",
    "use --to gptq or --to awq for 4-bit weights, --to fp8 for 8-bit (all load in vLLM)",
)
REFUSED_METHODS: dict[str, tuple[str, str]] = {"bnb": _NO_BNB, "bitsandbytes": _NO_BNB}
_HINT = "targets look like gguf:Q8_0, gguf:auto:size=100MB, gptq:group=64, fp8, hf:bf16"


def parse_target(spec: str | Target | dict[str, Any]) -> Target:
    """``--to`` text → its Target model (a Target is returned as it is). InputError (exit 2),
    naming the spec and what is valid, on anything unknown."""
    if not isinstance(spec, str):
        return target_from_dict(spec) if isinstance(spec, dict) else spec
    text = spec.strip()
    method, _, rest = text.partition(":")
    method = method.strip().lower()
    if method in REFUSED_METHODS:
        why, instead = REFUSED_METHODS[method]
        raise InputError(f"--to {spec}: {why}", instead)
    if method not in KINDS:
        if rest:
            raise InputError(f"unknown target {spec!r}", _HINT)
        method, rest = "gguf", text  # a bare GGUF type: Q8_0
    sections = [p.strip() for p in rest.split(":")] if rest.strip() else []
    if sections and sections[0].lower() == "auto" and f"{method}-auto" in KINDS:
        method, sections = f"{method}-auto", sections[1:]  # gptq:auto:bits=4.5
    fields: dict[str, Any] = {"method": method, **_options(spec, KINDS[method], sections)}
    return _validated(f"--to {spec}", fields)


def parse_targets(
    specs: str | Target | Iterable[str | Target | dict[str, Any]],
) -> list[Target]:
    """Every spec parsed once; the same target twice is one target (order kept)."""
    items = [specs] if isinstance(specs, (str, BaseModel)) else list(specs)
    out: list[Target] = []
    for s in items:
        t = parse_target(s)
        if t not in out:
            out.append(t)
    if not out:
        raise InputError("no target given", "pass --to gguf:F16 (repeatable)")
    return out


def target_from_dict(data: dict[str, Any], where: str = "target") -> Target:
    """A recipe's target entry (without name/gates/validate) → its Target model."""
    data = {"method": "gguf", **data}
    if data["method"] in REFUSED_METHODS:
        why, instead = REFUSED_METHODS[data["method"]]
        raise InputError(f"{where}: method {data['method']}: {why}", instead)
    return _validated(where, data)


def _options(spec: str, model: type[BaseModel], sections: list[str]) -> dict[str, Any]:
    """The items of ``sections`` as the model's fields (the module doc gives the grammar)."""
    opts: dict[str, Any] = {}
    bare = getattr(model, "bare", None)
    method = model.model_fields["method"].default
    for section in sections:
        listing: str | None = None  # the list option a bare word continues, in this section
        for item in filter(None, (s.strip() for s in section.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().lower().replace("-", "_")
            if not eq:
                if listing is not None:
                    opts[listing] += (item,)
                    continue
                if not opts and bare is not None:
                    key, value = bare, item
                elif _is_bool(model, key):
                    value = "true"
                else:
                    raise InputError(
                        f"--to {spec}: option {item!r} has no value",
                        f"write options as key=value, e.g. {method}:bits=4,group=64"
                        if method in ("gptq", "awq")
                        else options_hint(method),
                    )
            if key == "method":
                raise InputError(f"--to {spec}: 'method' is not an option")
            if key in opts:
                raise InputError(f"--to {spec}: {key}= given twice", options_hint(method))
            if _is_list(model, key):
                opts[key], listing = tuple(filter(None, [value.strip()])), key
            else:
                opts[key], listing = _coerce(value.strip()), None
    return opts


def _annotation(model: type[BaseModel], key: str) -> Any:
    f = model.model_fields.get(key)
    return f.annotation if f is not None else None


def _is_list(model: type[BaseModel], key: str) -> bool:
    a = _annotation(model, key)
    return a is not None and any(get_origin(x) is tuple for x in (a, *get_args(a)))


def _is_bool(model: type[BaseModel], key: str) -> bool:
    return _annotation(model, key) is bool


def updated(t: Target, update: dict[str, Any], where: str) -> Target:
    """A copy of ``t`` with ``update`` validated like the original fields."""
    return _validated(where, {**t.model_dump(), **update})


def _validated(where: str, fields: dict[str, Any]) -> Target:
    try:
        return _TARGET.validate_python(fields)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(p) for p in err["loc"][1:] if not isinstance(p, int)) or "options"
        if err["type"] == "union_tag_invalid":
            raise InputError(f"{where}: unknown target kind", _HINT) from None
        msg = (
            f"unknown option {loc!r}"
            if err["type"] == "extra_forbidden"
            else f"{loc}: {err['msg'].removeprefix('Value error, ')}"
        )
        raise InputError(f"{where}: {msg}", options_hint(fields.get("method", ""))) from None


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


def options_hint(method: str) -> str:
    """``gptq options: bits=4|8, group=32|64|128|channel, ...`` from the model's fields (or the
    model's own ``hint``)."""
    model = KINDS.get(method)
    if model is None:
        return _HINT
    if getattr(model, "hint", None):
        return str(model.hint)  # type: ignore[attr-defined]
    opts = []
    for name, f in model.model_fields.items():
        if name == "method":
            continue
        choices = getattr(f.annotation, "__args__", None)
        if name == "group":
            opts.append("group=32|64|128|channel")
        elif choices and all(isinstance(c, (str, int)) for c in choices):
            opts.append(f"{name}={'|'.join(str(c) for c in choices)}")
        else:
            opts.append(f"{name}=…")
    return f"{method} options: {', '.join(opts)}"


def _as_value_error(fn: Any, *args: Any) -> Any:
    """Run a quantkit parser inside a pydantic validator: its InputError becomes the
    ValueError pydantic reports with the field's path."""
    try:
        return fn(*args)
    except InputError as e:
        raise ValueError(e.message) from None
