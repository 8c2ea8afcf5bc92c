"""The ``gptq:auto`` target: an average bit width and the candidate schemes.

    gptq:auto:bits=4.5                   average bits per weight over the Linear layers that
                                         would otherwise be quantized (scales included), never
                                         above 4.5; candidates: every scheme of DEFAULT_TYPES
                                         this host's vLLM runs
    gptq:auto:bits=5:types=w4g64,fp8,float   only these candidates; one this host's vLLM cannot
                                         run is refused (exit 2) ...
    gptq:auto:bits=5:types=w8g128,w4g64:force   ... unless ``force`` (e.g. for another server)

quantkit/targets.py parses the text (options separated by ``:`` as in ``gguf:auto``); a typo
fails before any work.
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from quantkit.errors import InputError
from quantkit.quantize.vllm.auto.schemes import DEFAULT_TYPES, scheme

_HINT = (
    "write it as gptq:auto:bits=4.5 (optionally :types=w4g128,w4g64,w4g32,w8g128,fp8,int8,float "
    "and :force)"
)


class VllmAutoSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    family: ClassVar[str] = "vllm"  # one llm-compressor run, as every vLLM target
    bare: ClassVar[str | None] = None
    hint: ClassVar[str | None] = _HINT

    # its own kind in quantkit/targets.py's union (a recipe writes `method: gptq-auto`)
    method: Literal["gptq-auto"] = "gptq-auto"
    bits: float = Field(gt=0, le=16)  # average bits per weight, scales included
    types: tuple[str, ...] | None = None  # candidate scheme names; None: DEFAULT_TYPES
    force: bool = False  # keep candidates this host's vLLM cannot run
    dampening: float = Field(0.01, gt=0, lt=1)  # GPTQ: fraction of the Hessian diagonal mean

    @field_validator("types")
    @classmethod
    def _known(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is None:
            return v
        out: list[str] = []
        for name in v:
            s = scheme(name)
            if s is None:
                raise ValueError(
                    f"unknown scheme {name!r} "
                    "(w4g32|w4g64|w4g128, w8g32|w8g64|w8g128, fp8, int8, float)"
                )
            if s.name not in out:
                out.append(s.name)
        if not out:
            raise ValueError("types= is empty")
        return tuple(out)

    @property
    def candidates(self) -> tuple[str, ...]:
        return self.types or DEFAULT_TYPES

    @property
    def explicit(self) -> bool:
        return self.types is not None

    @property
    def needs_calibration(self) -> bool:
        return True

    @property
    def group_size(self) -> int | None:
        return None  # per group, decided by the plan (schemes that do not divide are not offered)

    def label(self) -> str:
        """Output folder suffix and artifact type, e.g. ``gptq-auto-4.5b``."""
        return f"{self.method}-{self.bits:g}b"


def is_vllm_auto(target: str) -> bool:
    method, _, rest = target.strip().lower().partition(":")
    return method == "gptq" and (rest == "auto" or rest.startswith("auto:"))


def parse_vllm_auto(target: str) -> VllmAutoSpec:
    """``gptq:auto:bits=4.5[:types=…][:force]`` → VllmAutoSpec through quantkit/targets.py's one
    grammar; InputError (exit 2) with a hint."""
    from quantkit.targets import parse_target

    if not is_vllm_auto(target):
        raise InputError(f"{target!r} is not a gptq:auto target", _HINT)
    t = parse_target(target)
    assert isinstance(t, VllmAutoSpec)
    return t
