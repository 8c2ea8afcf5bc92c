"""Recipes: one YAML file describing a release (source, calibration, targets, validation, gates).

``quantkit run RECIPE`` executes it (quantkit/pipeline/). Every model here rejects unknown keys,
and a bad recipe is reported as one line naming the offending key path (``targets[2].type``).
Relative input paths (model, texts) are relative to the recipe file; ``output`` and ``cache``
are relative to the current directory. ``model: default`` is the embedded
demo model (quantkit/demo.py); ``data: default`` is the demo text (quantkit/demo.py).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

import quantkit.recipes
from quantkit.errors import InputError
from quantkit.targets import IMATRIX_CTX, METHODS, REFUSED_METHODS, Target

DEFAULT = "default"  # the embedded default model / text
RECIPES_DIR = Path(quantkit.recipes.__file__).resolve().parent  # package data, also when installed
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
    ctx: int = Field(IMATRIX_CTX, ge=8, description="tokens per chunk (imatrix ctx / vLLM seq_len)")
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


class VllmValidation(_Strict):
    """How vLLM lays an artifact out: ranks = tensor × pipeline, one GPU each on a CUDA host, one
    process each on its own cores on a CPU host (refused before anything starts when the host
    has fewer)."""

    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)


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
    vllm: VllmValidation = Field(default_factory=VllmValidation)
    timeout: float = Field(3600.0, gt=0)
    # per-artifact time budget: past it (or once the measured rate projects far beyond it) the
    # artifact is reported "too-slow" with its rate, instead of running on for an hour
    max_minutes: float | None = Field(None, gt=0)


class RecipeTarget(_Strict):
    """A named target: what to make (quantkit/targets.py, the same fields as ``--to`` takes,
    written flat beside ``name``), with its own gates and whether to validate it."""

    name: str
    target: Target
    gates: GateSpec | None = None
    validate_: bool = Field(True, alias="validate")

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data: Any) -> Any:
        """``{name, method, type, ...}`` → ``{name, target: {method, type, ...}}``."""
        if not isinstance(data, dict) or "target" in data:
            return data
        own = {k: data[k] for k in ("name", "gates", "validate") if k in data}
        rest = {k: v for k, v in data.items() if k not in own}
        return {**own, "target": {"method": "gguf", **rest}}


class Recipe(_Strict):
    name: str
    description: str = ""
    source: Source
    calibration: Calibration | None = None
    targets: list[RecipeTarget] = Field(min_length=1)
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
            if t.target.method in ("gguf-lora", "vllm-lora"):
                raise InputError(
                    f"targets[{i}].method: a recipe makes models; {t.target.method} is the "
                    "adapter alone, which validation cannot score without its base",
                    "give source.adapter to make every target from the fine-tune, or export the "
                    "adapter with `quantkit convert BASE --adapter DIR --to gguf-lora`",
                )
            if getattr(t.target, "is_auto", False) and not t.target.imatrix:
                raise InputError(
                    f"targets[{i}]: type auto needs imatrix: true (and a calibration section)"
                )
            if getattr(t.target, "imatrix", False) and self.calibration is None:
                raise InputError(
                    f"targets[{i}].imatrix: needs a calibration section", "add calibration: data"
                )
            if "validate_" in t.model_fields_set and t.validate_ and self.validation is None:
                raise InputError(
                    f"targets[{i}].validate: needs a validation section",
                    "add validation: data, or set validate: false",
                )


def validated(recipe: Recipe, t: RecipeTarget) -> bool:
    """A target is validated when the recipe has a validation section, unless it opts out."""
    return recipe.validation is not None and bool(getattr(t, "validate_", True))


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part == "target" or part in METHODS:
            continue  # the wrapper and the union member pydantic tried: not keys of the file
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
            if m in REFUSED_METHODS:
                why, instead = REFUSED_METHODS[m]
                raise InputError(f"{where}: targets[{i}].method: {why}", instead)
            if m is not None and m not in METHODS:
                raise InputError(
                    f"{where}: targets[{i}].method: unknown method {m!r}",
                    "methods: " + ", ".join(METHODS),
                )
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
