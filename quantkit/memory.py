"""Memory: what a process used, what this machine offers, and what a step will need.

Peak resident memory is read from ``/proc/self/status`` (``VmHWM``, the high-water mark of this
process's own address space). ``getrusage(RUSAGE_SELF).ru_maxrss`` is not used for that: Linux
carries the high-water mark across ``fork`` + ``exec`` (``exec_mmap`` folds the old address
space's peak into ``signal->maxrss``), so a worker started from a big parent reports the parent's
peak as its own.
"""

from __future__ import annotations

import os
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import InputError

PROC_STATUS = Path("/proc/self/status")


def proc_status(path: Path = PROC_STATUS) -> dict[str, int]:
    """The ``kB`` fields of a ``/proc/<pid>/status`` file (or ``/proc/meminfo``, same layout),
    in bytes (empty where unreadable)."""
    out: dict[str, int] = {}
    try:
        text = path.read_text()
    except OSError:
        return out
    for line in text.splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB" and parts[0].isdigit():
            out[key] = int(parts[0]) * 1024
    return out


def own_peak_rss() -> int:
    """This process's peak resident set in bytes: ``VmHWM``, or ``ru_maxrss`` where /proc is
    missing (not Linux)."""
    hwm = proc_status().get("VmHWM")
    if hwm is not None:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux units: KiB


# -- what this machine has -----------------------------------------------------------------------

LIMIT_ENV = "QUANTKIT_MEMORY_LIMIT"  # e.g. "12G": a lower limit than the machine's, for tests
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """``"12G"``, ``"512M"``, ``"1.5G"`` or a byte count → bytes (binary units)."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        value = float(t[: len(t) - len(unit)])
    except ValueError:
        raise InputError(
            f"{LIMIT_ENV}={text!r} is not a size", "write it as bytes or with K/M/G, e.g. 12G"
        ) from None
    if value <= 0:
        raise InputError(f"{LIMIT_ENV}={text!r} must be positive")
    return int(value * _UNITS[unit])


def _cgroup_room() -> int | None:
    """Room left under this process's cgroup (v2) memory limit, None when none is set."""
    rel = ""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                rel = line[3:].strip().lstrip("/")
    except OSError:
        pass
    room = None
    for d in {Path("/sys/fs/cgroup") / rel, Path("/sys/fs/cgroup")}:
        try:
            limit = (d / "memory.max").read_text().strip()
            used = int((d / "memory.current").read_text())
        except (OSError, ValueError):
            continue
        if limit != "max":
            r = int(limit) - used
            room = r if room is None else min(room, r)
    return room


@dataclass(frozen=True)
class Room:
    """Memory a step may use now (bytes) and where the figure comes from."""

    bytes: int
    source: str


def memory_available() -> Room | None:
    """MemAvailable, bounded by a cgroup limit when one is set, and by ``QUANTKIT_MEMORY_LIMIT``
    when given; None when nothing can be read (not Linux, no limit set)."""
    found: list[Room] = []
    avail = proc_status(Path("/proc/meminfo")).get("MemAvailable")
    if avail is not None:
        found.append(Room(avail, "available"))
    cg = _cgroup_room()
    if cg is not None:
        found.append(Room(cg, "left under the cgroup limit"))
    env = os.environ.get(LIMIT_ENV)
    if env:
        found.append(Room(parse_size(env), f"allowed by {LIMIT_ENV}"))
    return min(found, key=lambda r: r.bytes) if found else None


# -- what a step needs ---------------------------------------------------------------------------

GIB = 2**30
# Anonymous memory of a Python process with torch and transformers imported and a model's
# modules built (weights aside): 0.26-0.30 GiB measured for a 1.5B and a tiny model.
TORCH_RUNTIME = 320 * 2**20
# The quantkit CLI process itself while a worker runs (tokenizer, numpy; no torch weights).
CLI_RUNTIME = 200 * 2**20
# llama.cpp worker besides its memory-mapped file: KV cache and compute buffers for one context.
LLAMACPP_RUNTIME = 300 * 2**20
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "F32": 4, "F16": 2, "BF16": 2}


@dataclass(frozen=True)
class Need:
    """A step's estimated peak anonymous memory: ``bytes``, the ``parts`` it adds up (label →
    bytes, for the message) and the option that lowers it (``fits``)."""

    step: str
    parts: dict[str, int]
    fits: str

    @property
    def bytes(self) -> int:
        return sum(self.parts.values())


def check(need: Need, room: Room | None = None) -> None:
    """Refuse, before the step starts, when ``need`` does not fit: one line with what it needs,
    what this machine has, and the option that fits. Any step can call it with its own
    ``Need`` (its own formula)."""
    room = room if room is not None else memory_available()
    if room is None or need.bytes <= room.bytes:
        return
    biggest = sorted(need.parts.items(), key=lambda kv: -kv[1])[:3]
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in biggest if v)
    raise InputError(
        f"{need.step} needs about {_gib(need.bytes)} of memory ({parts}); "
        f"this machine has {_gib(room.bytes)} {room.source}",
        need.fits,
    )


def _gib(n: int) -> str:
    return f"{n / GIB:.1f} GiB"


@dataclass(frozen=True)
class Shape:
    """What the estimates need from a checkpoint: sizes from its tensors, widths from config."""

    n_params: int
    weight_bytes: int
    source_dtype: str
    layer_params: int  # the largest decoder layer
    tensor_params: int  # the largest tensor
    other_params: int  # float tensors stored in another dtype than source_dtype (F32 norms)
    expert_params: int  # 3-D expert tensors transformers fuses in memory (MoE); 0 if dense
    n_embd: int
    n_ff: int
    n_head: int
    vocab: int
    config_dtype: str | None

    @classmethod
    def of(cls, ckpt: Any) -> Shape:
        import re

        from quantkit.checkpoint import FLOAT_DTYPES

        cfg = ckpt.config.get("text_config") or ckpt.config
        per_layer: dict[str, int] = {}
        experts = 0
        for name, t in ckpt.tensors.items():
            m = re.search(r"\.layers\.(\d+)\.", name)
            if m:
                per_layer[m[1]] = per_layer.get(m[1], 0) + t.n_elements
            if re.search(r"\.experts\.|_exps\b|block_sparse_moe\.experts", name):
                experts += t.n_elements
        n_embd = int(cfg.get("hidden_size") or 0)
        dtype = cfg.get("dtype") or cfg.get("torch_dtype") or ckpt.config.get("torch_dtype")
        return cls(
            n_params=sum(t.n_elements for t in ckpt.tensors.values()),
            weight_bytes=ckpt.nbytes,
            source_dtype=ckpt.source_dtype,
            layer_params=max(per_layer.values(), default=0),
            tensor_params=max((t.n_elements for t in ckpt.tensors.values()), default=0),
            other_params=sum(
                t.n_elements
                for t in ckpt.tensors.values()
                if t.dtype in FLOAT_DTYPES and t.dtype != ckpt.source_dtype
            ),
            expert_params=experts,
            n_embd=n_embd,
            n_ff=int(
                cfg.get("intermediate_size") or cfg.get("moe_intermediate_size") or 4 * n_embd
            ),
            n_head=int(cfg.get("num_attention_heads") or 1),
            vocab=int(cfg.get("vocab_size") or 0),
            config_dtype=dtype if isinstance(dtype, str) else None,
        )


def _layer_activations(s: Shape, ctx: int) -> int:
    """One chunk through one decoder layer in float32, eager attention: scores and softmax
    (2 × heads × ctx²), MLP gate/up/activation/product (4 × ctx × n_ff), Q/K/V/O and residuals
    (8 × ctx × n_embd)."""
    return 4 * (2 * s.n_head * ctx * ctx + 4 * ctx * s.n_ff + 8 * ctx * s.n_embd)


def imatrix_need(s: Shape, *, ctx: int, chunks: int) -> Need:
    """``collect_imatrix`` (one decoder layer at a time): one layer's weights widened to float32,
    every chunk's hidden states and masks carried between layers, one chunk's activations, and
    MoE expert tensors transformers concatenates in memory at load."""
    expert_fused = s.expert_params * DTYPE_BYTES.get(s.source_dtype, 4)
    widen = 0 if s.source_dtype == "F32" else s.layer_params * 4
    return Need(
        "imatrix",
        {
            "runtime": TORCH_RUNTIME,
            "one layer in float32": widen,
            f"hidden states of {chunks} chunks": chunks * ctx * (s.n_embd + ctx) * 4,
            "one chunk's activations": _layer_activations(s, ctx),
            "fused experts": expert_fused,
        },
        "lower --chunks (each carries its hidden states from layer to layer) or --ctx, "
        "or run on a machine with more memory",
    )


def reference_need(s: Shape, *, ctx: int, dtype: str | None) -> Need:
    """The validation reference in transformers (plus the CLI and the llama.cpp worker that
    follows it): weights stay views of the memory map, loaded in their stored dtype; a compute
    dtype that differs (``--reference-dtype``, or a config dtype other than the files') converts
    one module's weights at a time (quantkit/torch_dtype.py), so the largest tensor — except in a
    checkpoint of mixed dtypes, which loads converted whole. Logits and log-probs of one chunk
    are float32."""
    load = dtype or s.config_dtype or s.source_dtype
    load_bytes = DTYPE_BYTES.get(load, 4)
    fits = "lower --ctx, or run on a machine with more memory"
    if load_bytes == DTYPE_BYTES.get(s.source_dtype, 4):
        converted, what = s.other_params * load_bytes, "weights in another dtype, converted"
    elif not s.other_params:
        converted, what = s.tensor_params * load_bytes, f"largest tensor converted to {load}"
    else:
        converted, what = s.n_params * load_bytes, f"weights converted to {load} (mixed dtypes)"
        fits = f"--reference-dtype {_torch_name(s.source_dtype)} keeps most weights file-backed"
    return Need(
        "the validation reference",
        {
            "runtime": TORCH_RUNTIME + CLI_RUNTIME,
            what: converted,
            "MoE experts fused at load": s.expert_params * load_bytes,
            "logits of one chunk": 3 * ctx * s.vocab * 4,
            "one chunk's activations": _layer_activations(s, ctx),
        },
        fits,
    )


def _torch_name(dtype: str) -> str:
    return {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}.get(dtype, dtype)


def llamacpp_need(gguf_bytes: int) -> Need:
    """A GGUF scored in llama.cpp: the file is memory-mapped, but the CPU backend repacks the
    matrices of some types (Q4_0, Q4_K, IQ4_NL, … into interleaved rows) into anonymous buffers
    at load — measured 62 of a 95 MiB Q4_K_M file, none with ``use_extra_bufts`` off — so the
    whole file is the bound; plus one context's KV cache and compute buffers, and the CLI."""
    return Need(
        "scoring in llama.cpp",
        {
            "runtime": LLAMACPP_RUNTIME + CLI_RUNTIME,
            "weights repacked by the CPU backend (at most the file)": gguf_bytes,
        },
        "validate on a machine with more memory",
    )
