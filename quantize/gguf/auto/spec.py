"""The ``gguf:auto`` target: a size or bits-per-weight budget and the candidate tensor types.

    gguf:auto:size=100MB            file no larger than 100,000,000 bytes (KB/MB/GB: powers of
                                    1000; KiB/MiB/GiB: of 1024; a bare number is bytes)
    gguf:auto:bpw=4.5               tensor bytes × 8 / parameters ≈ 4.5 (quantkit's bits per
                                    weight, as `inspect` prints it), never above
    gguf:auto:size=90MB:types=Q4_K,Q5_K,Q8_0   only these candidate types (plus what a tensor
                                    must keep: 1-D tensors stay F32)

Exactly one of ``size`` and ``bpw``. quantkit/targets.py parses the text into a ``GGUFTarget``
(``type: auto``) with the value parsers here; ``GGUFTarget.auto_spec()`` copies its fields into
this frozen dataclass, the budget the planner reads.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from quantkit.errors import InputError
from quantkit.quantize.gguf import ggml

PREFIX = "gguf:auto"
_HINT = "write it as gguf:auto:size=100MB or gguf:auto:bpw=4.5 (optionally :types=Q4_K,Q5_K,Q8_0)"
_UNITS = {
    "": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*$")


def is_auto_target(target: str) -> bool:
    t = target.strip().lower()
    return t == PREFIX or t.startswith(PREFIX + ":")


@dataclass(frozen=True)
class AutoSpec:
    size: int | None = None  # bytes of the whole file
    bpw: float | None = None  # bits per weight of the tensor data
    types: tuple[str, ...] | None = None  # ggml tensor type names (upper case); None: all

    @property
    def name(self) -> str:
        """The artifact's type label and file-name suffix: AUTO-100000000B / AUTO-4.5BPW."""
        return f"AUTO-{self.size}B" if self.size is not None else f"AUTO-{self.bpw:g}BPW"


def parse_size(text: str) -> int:
    m = _SIZE.match(text)
    unit = m.group(2).upper() if m else ""
    if not m or unit not in _UNITS:
        raise InputError(
            f"bad size {text!r}", "give bytes, or a number with KB/MB/GB or KiB/MiB/GiB"
        )
    return int(float(m.group(1)) * _UNITS[unit])


def parse_types(text: str) -> tuple[str, ...]:
    out: list[str] = []
    for name in (x.strip().upper() for x in text.split(",")):
        if not name:
            continue
        if name not in ggml.names():
            raise InputError(
                f"gguf:auto: {name!r} is not a ggml tensor type",
                "use tensor types such as Q4_K,Q5_K,Q6_K,Q8_0,IQ4_XS (not file types like Q4_K_M)",
            )
        if name not in out:
            out.append(name)
    if not out:
        raise InputError("gguf:auto: types= is empty", _HINT)
    return tuple(out)


def parse_auto(target: str) -> AutoSpec:
    """``gguf:auto:size=…|bpw=…[:types=…]`` → AutoSpec through quantkit/targets.py's one grammar;
    InputError (exit 2) with a hint."""
    from quantkit.targets import GGUFTarget, parse_target

    if not is_auto_target(target):
        raise InputError(f"{target!r} is not a gguf:auto target", _HINT)
    t = parse_target(target)
    assert isinstance(t, GGUFTarget)
    return t.auto_spec()
