"""Recipes: one YAML file describing a release (source, calibration, targets, validation, gates).

``quantkit run RECIPE`` executes it (quantkit/pipeline.py). Every model here rejects unknown keys,
and a bad recipe is reported as one line naming the offending key path (``targets[2].type``).
Relative input paths (model, texts) are relative to the recipe file; ``output`` and ``cache``
are relative to the current directory. ``model: default`` is the embedded
demo model (quantkit/demo.py); ``data: default`` is the demo text (quantkit/demo_run.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from quantkit.errors import InputError

DEFAULT = "default"  # the embedded default model / text
RECIPES_DIR = Path(__file__).resolve().parent.parent / "recipes"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Source(_Strict):
    model: str = Field(
        description="HF checkpoint folder, a Hub id `org/name[@revision]` (through the HF cache), "
        "or `default` (the embedded demo model)"
    )
    adapter: str | None = Field(
        None,
        description="a PEFT LoRA adapter folder trained on `model`: every target is made from "
        "the fine-tune (merged), and validated against base + adapter in transformers",
    )


class Calibration(_Strict):
    data: str = Field(description="calibration text file, or `default` (the demo text)")
    ctx: int = Field(512, ge=8, description="tokens per chunk (imatrix ctx / vLLM seq_len)")
    chunks: int | None = Field(None, ge=1, description="at most this many chunks (None: all)")
    samples: int = Field(64, ge=1, description="vLLM targets: calibration samples")
    seed: int = 0


class GateSpec(_Strict):
    """The same gates as ``quantkit validate`` (validate/harness.py Gates)."""

    max_kld: float | None = Field(None, ge=0)
    max_ppl_increase_pct: float | None = None
    min_top1_pct: float | None = Field(None, ge=0, le=100)
    per_type_defaults: bool = False

    def merged(self, over: GateSpec | None) -> GateSpec:
        """``over``'s keys that are set win over these (per-target gates over global ones)."""
        if over is None:
            return self
        return self.model_copy(update=over.model_dump(exclude_unset=True))


class Validation(_Strict):
    data: str = Field(description="held-out text file, or `default` (the demo text)")
    ctx: int = Field(512, ge=8)
    chunks: int | None = Field(None, ge=1)
    threads: int | None = Field(None, ge=1)
    pp: int = Field(512, ge=1, description="prompt tokens for the speed test")
    tg: int = Field(128, ge=1, description="generated tokens for the speed test")
    kv_f32: bool = False
    # vLLM without torch.compile / CUDA graphs: starts about a minute sooner on 2 CPU cores;
    # quality figures are the same, generation speed is lower
    vllm_eager: bool = False
    timeout: float = Field(3600.0, gt=0)
    # per-artifact time budget: past it (or once the measured rate projects far beyond it) the
    # artifact is reported "too-slow" with its rate, instead of running on for an hour
    max_minutes: float | None = Field(None, gt=0)


class GGUFTarget(_Strict):
    name: str
    method: Literal["gguf"] = "gguf"
    type: str = Field(
        description="llama.cpp file type: F16, Q8_0, Q4_K_M, IQ4_XS, ...; or `auto` with `size` "
        "or `bpw`: the per-tensor mix of least predicted KLD in that budget (gguf:auto)"
    )
    imatrix: bool = Field(False, description="quantize with the calibration importance matrix")
    size: int | str | None = Field(
        None, description="type auto: file size budget (bytes, or 100MB)"
    )
    bpw: float | None = Field(None, gt=0, le=32, description="type auto: bits per weight budget")
    types: list[str] | None = Field(None, description="type auto: candidate tensor types")
    overrides: list[str] = Field(default_factory=list, description="PATTERN=TYPE per tensor")
    output_type: str | None = None
    embedding_type: str | None = None
    gates: GateSpec | None = None
    validate_: bool = Field(True, alias="validate")

    @field_validator("type")
    @classmethod
    def _known_type(cls, v: str) -> str:
        from quantkit.quantize.gguf_types import GGUF_TYPES

        up = v.upper()
        if up != "AUTO" and up not in GGUF_TYPES:
            raise ValueError(f"unknown GGUF type {v!r} (e.g. F16, Q8_0, Q4_K_M)")
        return up

    @model_validator(mode="after")
    def _auto(self) -> GGUFTarget:
        if self.type != "AUTO":
            if self.size is not None or self.bpw is not None or self.types is not None:
                raise ValueError("size, bpw and types apply to type: auto")
            return self
        if not self.imatrix:
            raise ValueError("type auto needs imatrix: true (and a calibration section)")
        try:
            self.auto_spec()
        except InputError as e:
            raise ValueError(e.message) from None
        return self

    def auto_spec(self) -> Any:
        """The gguf:auto target this entry stands for (quantize/auto/spec.py)."""
        from quantkit.quantize.auto.spec import parse_auto

        parts = ["gguf:auto"]
        parts += [f"size={self.size}"] if self.size is not None else []
        parts += [f"bpw={self.bpw}"] if self.bpw is not None else []
        parts += [f"types={','.join(self.types)}"] if self.types else []
        return parse_auto(":".join(parts))

    @field_validator("overrides")
    @classmethod
    def _overrides(cls, v: list[str]) -> list[str]:
        from quantkit.quantize.gguf import parse_overrides

        try:
            parse_overrides(v)
        except InputError as e:
            raise ValueError(e.message) from None
        return v


def _vllm_members() -> tuple[type[BaseModel], ...]:
    """AWQ/GPTQ/FP8 targets reuse the option models of quantize/vllm_targets.py
    with a name and gates added; absent from a build without it, so the union is GGUF only."""
    try:
        from quantkit.quantize import vllm_targets as vt
    except ImportError:
        return ()
    out = []
    for base in (vt.GPTQTarget, vt.AWQTarget, vt.FP8Target):
        extra = {
            "__annotations__": {"name": str, "gates": GateSpec | None, "validate_": bool},
            "gates": None,
            "validate_": Field(True, alias="validate"),
        }
        out.append(type(f"Recipe{base.__name__}", (base,), extra))
    return tuple(out)


_VLLM = _vllm_members()
VLLM_METHODS = tuple(m.model_fields["method"].default for m in _VLLM)
if _VLLM:
    Target = Annotated[  # type: ignore[misc]
        GGUFTarget | _VLLM[0] | _VLLM[1] | _VLLM[2],  # type: ignore[valid-type]
        Field(discriminator="method"),
    ]
else:
    Target = GGUFTarget  # type: ignore[misc]


class Recipe(_Strict):
    name: str
    description: str = ""
    source: Source
    calibration: Calibration | None = None
    targets: list[Target] = Field(min_length=1)  # type: ignore[valid-type]
    validation: Validation | None = None
    gates: GateSpec = Field(default_factory=GateSpec)
    output: str = Field("out", description="output folder (relative to the current directory)")
    cache: str | None = Field(None, description="shared intermediates (default: OUTPUT/.cache)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("use letters, digits, '.', '_' or '-'")
        return v

    def model_post_init(self, __context: Any) -> None:
        names = [t.name for t in self.targets]
        for i, n in enumerate(names):
            if not NAME_RE.match(n):
                raise InputError(f"targets[{i}].name: {n!r}: use letters, digits, '.', '_' or '-'")
            if names.index(n) != i:
                raise InputError(f"targets[{i}].name: {n!r} is used twice", "names must differ")
            t = self.targets[i]
            if getattr(t, "imatrix", False) and self.calibration is None:
                raise InputError(
                    f"targets[{i}].imatrix: needs a calibration section", "add calibration: data"
                )
            if "validate_" in t.model_fields_set and t.validate_ and self.validation is None:
                raise InputError(
                    f"targets[{i}].validate: needs a validation section",
                    "add validation: data, or set validate: false",
                )


def validated(recipe: Recipe, t: Any) -> bool:
    """A target is validated when the recipe has a validation section, unless it opts out."""
    return recipe.validation is not None and bool(getattr(t, "validate_", True))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("gguf", "gptq", "awq", "fp8") and out.endswith("]"):
            continue  # the union member pydantic tried: not a key of the user's file
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def parse(data: Any, where: str = "recipe") -> Recipe:
    """A Recipe from parsed YAML; InputError naming the first offending key path."""
    if not isinstance(data, dict):
        raise InputError(f"{where}: a recipe is a mapping (name:, source:, targets: ...)")
    targets = data.get("targets")
    if isinstance(targets, list):
        for i, t in enumerate(targets):
            m = t.get("method", "gguf") if isinstance(t, dict) else None
            if m is not None and m not in ("gguf", *VLLM_METHODS):
                hint = (
                    "this build has no vLLM targets (quantize/vllm_targets.py)"
                    if m in ("gptq", "awq", "fp8")
                    else "methods: gguf, " + ", ".join(VLLM_METHODS or ("gptq", "awq", "fp8"))
                )
                raise InputError(f"{where}: targets[{i}].method: unknown method {m!r}", hint)
            if isinstance(t, dict):
                t.setdefault("method", "gguf")
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        more = f" (+{e.error_count() - 1} more)" if e.error_count() > 1 else ""
        msg = err["msg"].removeprefix("Value error, ")
        raise InputError(f"{where}: {_loc(err['loc'])}: {msg}{more}") from None
    except InputError as e:
        raise InputError(f"{where}: {e.message}", e.hint) from None


def load(path: Path) -> Recipe:
    import yaml

    if not path.is_file():
        raise InputError(f"{path}: recipe not found", "`quantkit recipes list` shows the examples")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}:{at} not valid YAML ({getattr(e, 'problem', e)})") from None
    return parse(data, str(path))


def find(name_or_path: str) -> Path:
    """A recipe file: a path, or the name of a shipped example (recipes/NAME.yaml)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    shipped = RECIPES_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    raise InputError(
        f"{name_or_path}: no such recipe", "`quantkit recipes list` shows the examples"
    )


def shipped() -> list[Path]:
    return sorted(RECIPES_DIR.glob("*.yaml")) if RECIPES_DIR.is_dir() else []
