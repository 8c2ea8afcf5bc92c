"""What an artifact is, read once: the engine that runs it, its capability-matrix rows and the
label the report shows.

``describe(path)`` reads a GGUF's header once (the bounded reader, quantize/gguf/reader.py) or
an HF folder's config.json once (a LoRA folder: adapter_config.json), and derives from that one
read every answer ``validate`` needs about the artifact's format:

- ``engine(hf_engine)``: llama.cpp for a GGUF; vLLM for a LoRA folder and for a quantized
  checkpoint vLLM loads (``QUANT_METHOD_ENGINE``); else the engine asked for HF folders
  (``validate --engine``), else transformers;
- ``rows``: the capability matrix rows it needs (validate/capabilities.py: one, or one per scheme
  of a mixed-precision checkpoint), empty when the matrix has no row for its format;
- ``label``: the report's "type" of an HF folder (``W4A16 g64``, ``GPTQ 4-bit g128``, ``BF16``,
  ``LoRA r8``); a GGUF's comes from its audit.

Results are cached by path and modification time, so the several questions of one validation
cost one read.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.checkpoint import json_or_none
from quantkit.errors import InputError, QuantkitError

# the engines' names (validate/engines.py ``Engine.name``)
LLAMA_CPP = "llama.cpp"
VLLM = "vllm"
TRANSFORMERS = "transformers"

# quantization_config.quant_method of an HF folder → the engine that loads it. These are the
# checkpoints quantkit's vLLM exports write (compressed-tensors; legacy AutoGPTQ/AutoAWQ layouts)
# and vLLM's own FP8 format; transformers alone cannot run them on CPU.
QUANT_METHOD_ENGINE: dict[str, str] = {
    "compressed-tensors": VLLM,
    "gptq": VLLM,
    "awq": VLLM,
    "fp8": VLLM,
}
_DTYPE_ROW = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
_DTYPE_LABEL = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@dataclass(frozen=True)
class Described:
    """One artifact's format, as ``validate`` and the capability matrix name it."""

    path: Path
    kind: str  # gguf | gguf-lora | hf | vllm-lora | unknown
    quant_method: str | None = None  # an HF folder's quantization_config.quant_method
    rows: tuple[str, ...] = ()  # capability matrix rows; () when the matrix has none for it
    label: str | None = None  # the report's type of an HF folder
    gguf_type: str | None = None  # a GGUF model file's type (Q4_K_M, F16, ...)

    @property
    def row(self) -> str | None:
        """The row that names the format (a mixed checkpoint: its int group's)."""
        return self.rows[0] if self.rows else None

    def engine(self, hf_engine: str | None = None) -> str:
        """The engine that runs it (module doc); InputError when it is neither a GGUF nor an
        HF folder."""
        if self.kind in ("gguf", "gguf-lora"):
            return LLAMA_CPP
        if self.kind == "vllm-lora":
            return VLLM
        if self.kind == "hf":
            return QUANT_METHOD_ENGINE.get(self.quant_method or "") or hf_engine or TRANSFORMERS
        raise InputError(f"{self.path}: not a GGUF file or a Hugging Face model folder")


def describe(path: str | Path) -> Described:
    """The artifact at ``path``, read once per path and modification time."""
    p = Path(path)
    marker = p / "config.json" if p.is_dir() else p
    if p.is_dir() and not marker.exists():
        marker = p / "adapter_config.json"
    try:
        st = marker.stat()
        key = (st.st_mtime_ns, st.st_size)
    except OSError:
        key = (0, 0)
    return _describe(p, key)


@functools.lru_cache(maxsize=256)
def _describe(p: Path, _key: tuple[int, int]) -> Described:
    if is_lora_dir(p):
        return Described(p, "vllm-lora", rows=("vllm-lora",), label=_lora_label(p))
    if p.is_file():
        return _gguf(p)
    if p.suffix.lower() == ".gguf":
        return Described(p, "gguf")
    if not (p.is_dir() and (p / "config.json").is_file()):
        return Described(p, "unknown")
    cfg = json_or_none(p / "config.json")
    if not isinstance(cfg, dict):
        return Described(p, "hf")  # transformers says what is wrong with it
    q = cfg.get("quantization_config")
    q = q if isinstance(q, dict) else None
    method = str(q["quant_method"]) if q and q.get("quant_method") else None
    return Described(p, "hf", method, _hf_rows(cfg, q), _hf_label(cfg, q))


def is_lora_dir(path: str | Path) -> bool:
    """A PEFT LoRA adapter folder (``--to vllm-lora`` writes one): adapter_config.json and no
    config.json of its own. vLLM scores it on a base model with its LoRA requests."""
    p = Path(path)
    return p.is_dir() and (p / "adapter_config.json").is_file() and not (p / "config.json").exists()


def _gguf(p: Path) -> Described:
    """A file: a GGUF by its magic or its name; its header read once."""
    from quantkit.quantize.gguf.audit import file_type_of
    from quantkit.quantize.gguf.reader import read_gguf

    with p.open("rb") as f:
        magic = f.read(4)
    if magic != b"GGUF" and p.suffix.lower() != ".gguf":
        return Described(p, "unknown")
    try:
        info = read_gguf(p)
    except QuantkitError:
        return Described(p, "gguf")  # llama.cpp says what is wrong with it
    if info.metadata.get("general.type") == "adapter":
        return Described(p, "gguf-lora", rows=("gguf-lora",))
    t = file_type_of(info)
    name = t.name if t is not None else None
    return Described(p, "gguf", rows=(f"gguf:{name}",) if name else (), gguf_type=name)


# -- capability rows of an HF folder (validate/capabilities.py: the row ids) ---------------------


def _hf_rows(cfg: dict[str, Any], q: dict[str, Any] | None) -> tuple[str, ...]:
    """``[moe/]FORMAT:DTYPE`` for each scheme the checkpoint holds (a mixed-precision one,
    gptq:auto, several compressed-tensors config groups); () when the matrix has no row."""
    dtype = _DTYPE_ROW.get(str(cfg.get("dtype") or cfg.get("torch_dtype") or ""))
    if dtype is None:
        return ()
    moe = any(int(cfg.get(k) or 0) > 1 for k in ("num_experts", "num_local_experts"))
    prefix = "moe/" if moe else ""
    row = _quant_format(q) if q is not None else "hf"
    if row is None:
        return ()
    out = [f"{prefix}{row}:{dtype}"]
    groups = q.get("config_groups") if q is not None else None
    if isinstance(groups, dict) and len(groups) > 1:
        each = [_quant_format({**q, "config_groups": {"g": g}}) for g in groups.values()]  # type: ignore[dict-item]
        if all(f is not None for f in each):
            out = [f"{prefix}{f}:{dtype}" for f in each]
    return tuple(dict.fromkeys(out))


def _group_tag(g: Any) -> str | None:
    if g in (None, -1):
        return "ch"
    return f"g{g}" if g in (32, 64, 128) else None


def _quant_format(q: dict[str, Any]) -> str | None:
    method = q.get("quant_method")
    if method in ("gptq", "awq"):
        g = _group_tag(q.get("group_size"))
        sym = q.get("sym", True) if method == "gptq" else not q.get("zero_point", True)
        return None if g is None else f"{method}-w{q.get('bits')}{g}{'' if sym else '-asym'}"
    if method != "compressed-tensors":
        return None
    groups = [g for g in (q.get("config_groups") or {}).values() if isinstance(g, dict)]
    if not groups:
        return None
    # a mixed-precision checkpoint (gptq:auto) is named by its int group's row; its rows hold
    # every group's
    groups.sort(key=lambda g: (g.get("weights") or {}).get("type") != "int")
    w = groups[0].get("weights") or {}
    a = groups[0].get("input_activations") or None
    if w.get("type") == "float" and w.get("num_bits") == 8:
        if w.get("strategy") == "block":
            scheme = "block"
        else:
            scheme = "dynamic" if (a or {}).get("dynamic") else "static"
        ign = q.get("ignore") or []
        float_experts = any(re.search(r"experts", str(i)) and i.startswith("re:") for i in ign)
        return f"fp8-{scheme}" + ("+float-experts" if float_experts else "")
    if w.get("type") == "float" and w.get("num_bits") == 4:  # NVFP4: per 16, MXFP4: per 32
        kind = {16: "nvfp4", 32: "mxfp4"}.get(w.get("group_size") or 0)
        return None if kind is None else kind + ("" if a else "-a16")
    if w.get("type") == "int" and w.get("num_bits") == 8 and a is not None:
        if a.get("type") != "int" or a.get("num_bits") != 8:
            return None
        return "w8a8-int8" + ("" if a.get("dynamic") else "-static")
    if w.get("type") == "int" and a is None and w.get("num_bits") in (4, 8):
        g = _group_tag(w.get("group_size"))
        return (
            None
            if g is None
            else (f"w{w['num_bits']}a16-{g}{'' if w.get('symmetric', True) else '-asym'}")
        )
    return None


# -- the report's type label of an HF folder -----------------------------------------------------


def _lora_label(p: Path) -> str:
    ad = json_or_none(p / "adapter_config.json")
    if not isinstance(ad, dict):
        return "LoRA"
    return f"LoRA r{ad.get('r', '?')}" + (" rs" if ad.get("use_rslora") else "")


def _hf_label(cfg: dict[str, Any], q: dict[str, Any] | None) -> str | None:
    """The quantization scheme (e.g. "W4A16 g64", "W8A8 FP8", "GPTQ 4-bit g128") or the dtype
    ("BF16")."""
    method = (q or {}).get("quant_method")
    if q is not None and method in ("gptq", "awq"):
        g = q.get("group_size")
        return f"{method.upper()} {q.get('bits', '?')}-bit" + (f" g{g}" if g and g > 0 else "")
    if q is not None and method == "compressed-tensors":
        labels = []  # several in a mixed-precision checkpoint (gptq:auto): "W4A16 g64+W8A8 FP8"
        for g in (q.get("config_groups") or {}).values():
            w = g.get("weights") or {}
            a = g.get("input_activations") or {}
            label = f"W{w.get('num_bits', '?')}A{a.get('num_bits', 16) if a else 16}"
            fp4 = w.get("type") == "float" and w.get("num_bits") == 4
            if fp4:  # compressed-tensors' NVFP4 (per 16) and MXFP4 (per 32) presets
                label += " " + {16: "NVFP4", 32: "MXFP4"}.get(w.get("group_size") or 0, "FP4")
            elif w.get("type") == "float":
                label += " FP8" if w.get("num_bits") == 8 else " FP"
            elif a and a.get("type") == "int":  # W8A8 INT8
                label += " INT8" + ("" if a.get("dynamic") else " static")
            if w.get("group_size") and not fp4:
                label += f" g{w['group_size']}"
            labels.append(label)
        return "+".join(sorted(dict.fromkeys(labels))) or "compressed-tensors"
    if method:
        return str(method)
    dtype = cfg.get("dtype") or cfg.get("torch_dtype")
    return _DTYPE_LABEL.get(str(dtype), str(dtype).upper() if dtype else None)
