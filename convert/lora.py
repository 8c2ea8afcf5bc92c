"""PEFT LoRA adapters: read, check against a base checkpoint, merge per tensor, export.

An adapter directory holds ``adapter_config.json`` and ``adapter_model.safetensors`` (PEFT's
``save_pretrained``). Its tensors are named ``base_model.model.<module>.lora_A.weight`` /
``lora_B.weight`` (``lora_embedding_A`` / ``_B`` for embeddings), and modules it trained in full
(``modules_to_save``) as ``base_model.model.<module>.weight``.

PEFT's forward for a LoRA linear is ``y = W x + scale · B (A x)`` with ``scale = alpha / r``, or
``alpha / sqrt(r)`` when ``use_rslora`` (peft/tuners/lora/layer.py ``update_layer``); ``r`` and
``alpha`` per module come from ``rank_pattern`` / ``alpha_pattern`` when a key matches. Merging
is then ``W + scale · B @ A`` (transposed when ``fan_in_fan_out``), done here in float32 one
tensor at a time while the base streams to the writer.
"""

from __future__ import annotations

import math
import mmap
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.casts import to_f32
from quantkit.checkpoint import (
    FLOAT_DTYPES,
    SAFETENSORS_DTYPES,
    TensorInfo,
    parse_safetensors_header,
    read_json,
)
from quantkit.errors import InputError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
# Files that make the adapter directory carry its own tokenizer (a fine-tune that added tokens
# or set a chat template saves them next to the adapter).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")

# adapter_config.json keys whose non-default value changes the math in a way this merge does
# not implement: key -> (value that is fine, what it is). Listed at once when any is set.
UNSUPPORTED: dict[str, tuple[Any, str]] = {
    "use_dora": (False, "DoRA (weight-decomposed LoRA)"),
    "lora_bias": (False, "LoRA bias terms"),
    "layer_replication": (None, "layer replication"),
    "trainable_token_indices": (None, "trainable token indices"),
    "alora_invocation_tokens": (None, "activated LoRA (aLoRA)"),
    "use_qalora": (False, "QALoRA"),
}

# tensor-name suffixes in adapter_model.safetensors
_LORA_KEYS = {
    ".lora_A.weight": ("a", False),
    ".lora_B.weight": ("b", False),
    ".lora_embedding_A": ("a", True),
    ".lora_embedding_B": ("b", True),
}


# saved full copies of a module: infix -> precedence (the trained copy wins)
_FULL_INFIXES = {".base_layer.": 1, ".modules_to_save.": 2}


class AdapterError(InputError):
    """An adapter that cannot be used with this base (or at all)."""


def pattern_key(patterns: dict[str, Any], module: str) -> str | None:
    """The rank/alpha pattern key matching ``module``, as PEFT matches it (peft/utils/other.py
    ``get_pattern_key``: the key equals the module name or matches a dotted suffix of it)."""
    for key in patterns:
        if key == module or re.match(rf"(.*\.)?({key})$", module):
            return key
    return None


@dataclass
class LoraModule:
    module: str  # e.g. model.layers.0.self_attn.q_proj
    target: str  # the base tensor it changes, e.g. model.layers.0.self_attn.q_proj.weight
    a: str = ""  # adapter tensor names
    b: str = ""
    embedding: bool = False
    rank: int = 0
    alpha: float = 0.0
    scale: float = 0.0


@dataclass
class LoraAdapter:
    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    modules: dict[str, LoraModule]  # by base tensor name
    replaced: dict[str, str]  # base tensor name -> adapter tensor (modules_to_save)
    _map: mmap.mmap | None = field(default=None, repr=False)
    _arrays: dict[str, Any] | None = field(default=None, repr=False)  # in memory (from_peft)

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: str | Path) -> LoraAdapter:
        root = Path(path)
        if not root.is_dir():
            raise AdapterError(
                f"{root}: no such adapter directory",
                "give the folder PEFT's save_pretrained wrote (adapter_config.json + adapter_model.safetensors)",
            )
        missing = [n for n in (CONFIG, WEIGHTS) if not (root / n).is_file()]
        if missing:
            hint = "save the adapter with PEFT's save_pretrained (safetensors)"
            if WEIGHTS in missing and (root / "adapter_model.bin").is_file():
                hint = (
                    "only adapter_model.bin (pickle) is there: re-save with safe_serialization=True"
                )
            raise AdapterError(f"{root}: adapter is missing {', '.join(missing)}", hint)
        config = read_json(root / CONFIG)
        if not isinstance(config, dict):
            raise AdapterError(f"{root / CONFIG}: not a JSON object")
        cls._check_config(root, config)
        tensors, _ = parse_safetensors_header(root / WEIGHTS)
        return cls(root, config, tensors, *_index(root, config, tensors))

    @classmethod
    def from_peft(cls, peft_model: Any, adapter_name: str = "default") -> LoraAdapter:
        """The active adapter of a ``peft`` model in memory, named and checked exactly as if it
        had been saved with ``save_pretrained`` (PEFT's own ``get_peft_model_state_dict``), with
        its tensors read in place."""
        from peft import get_peft_model_state_dict

        config = peft_model.peft_config[adapter_name].to_dict()
        config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
        ptype = str(getattr(config.get("peft_type"), "value", config.get("peft_type", "")))
        config["peft_type"] = ptype
        cls._check_config(Path("<memory>"), config)
        sd = get_peft_model_state_dict(peft_model, adapter_name=adapter_name)
        arrays = {k: t.detach() for k, t in sd.items()}
        tensors = {k: memory_info(k, t) for k, t in arrays.items()}
        return cls(Path(f"<adapter {adapter_name}>"), config, tensors,
                   *_index(Path("<memory>"), config, tensors), _arrays=arrays)  # fmt: skip

    @staticmethod
    def _check_config(root: Path, config: dict[str, Any]) -> None:
        ptype = str(config.get("peft_type", "")).upper()
        if ptype != "LORA":
            raise AdapterError(
                f"{root}: PEFT type {config.get('peft_type')!r} is not supported (only LORA)",
                "merge it in PEFT (merge_and_unload) and convert the merged model",
            )
        bad = [
            what for k, (ok, what) in UNSUPPORTED.items() if config.get(k, ok) not in (ok, [], {})
        ]
        if bad:
            raise AdapterError(
                f"{root}: adapter uses {', '.join(bad)}, which quantkit does not merge",
                "merge it in PEFT (merge_and_unload) and convert the merged model",
            )

    # -- facts -----------------------------------------------------------------------------------
    @property
    def base_name(self) -> str:
        return str(self.config.get("base_model_name_or_path") or "")

    @property
    def has_tokenizer(self) -> bool:
        return any((self.path / n).is_file() for n in TOKENIZER_FILES)

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    def merged_config(self, config: dict[str, Any]) -> dict[str, Any]:
        """The base's config.json for the merged model: a fine-tune that added tokens saved a
        resized embed_tokens (modules_to_save), and the merged vocabulary is that size."""
        for target, name in self.replaced.items():
            rows = self.tensors[name].shape[0]
            if target.endswith("embed_tokens.weight") and rows != config.get("vocab_size"):
                return {**config, "vocab_size": rows}
        return config

    def shapes(self, base: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """The base's tensor shapes with the adapter's full replacements laid over them."""
        out = dict(base)
        for target, name in self.replaced.items():
            out[target] = self.tensors[name].shape
        return out

    def check_base(self, base: dict[str, tuple[int, ...]]) -> None:
        """Every adapted module exists in the base with a shape the adapter fits; all offenders
        are named at once."""
        problems: list[str] = []
        for m in self.modules.values():
            if m.target not in base:
                problems.append(
                    f"{m.module} (targeted by the adapter) has no tensor {m.target!r} in the base"
                )
                continue
            a, b = self.tensors[m.a].shape, self.tensors[m.b].shape
            w = base[m.target]
            if m.embedding:  # A: [r, vocab], B: [hidden, r]; W: [vocab, hidden]
                want_a, want_b = (m.rank, w[0]), (w[1] if len(w) > 1 else -1, m.rank)
            else:
                out_f, in_f = (
                    (w[1], w[0]) if self.fan_in_fan_out else (w[0], w[1] if len(w) > 1 else -1)
                )
                want_a, want_b = (m.rank, in_f), (out_f, m.rank)
            if len(w) != 2 or a != want_a or b != want_b:
                problems.append(
                    f"adapter {m.a} {list(a)} / {m.b} {list(b)} do not fit base {m.target} {list(w)}"
                )
        for target, name in self.replaced.items():
            if target not in base:
                problems.append(f"adapter tensor {name} replaces {target!r}, which the base lacks")
        if problems:
            more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
            raise AdapterError(
                f"{self.path}: adapter does not fit the base: {'; '.join(problems[:3])}{more}",
                "use the base model the adapter was trained on",
            )

    @property
    def fan_in_fan_out(self) -> bool:
        return bool(self.config.get("fan_in_fan_out", False))

    # -- reading ---------------------------------------------------------------------------------
    def float32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if self._arrays is not None:
            return torch_to_f32(self._arrays[name])
        if self._map is None:
            with open(info.file, "rb") as f:
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        raw = np.frombuffer(
            self._map,
            dtype=SAFETENSORS_DTYPES[info.dtype][0],
            count=info.n_elements,
            offset=info.start,
        ).reshape(info.shape)
        return to_f32(raw, info.dtype)

    def delta(self, target: str) -> np.ndarray | None:
        """``scale · B @ A`` in float32, laid out like the base tensor; None if not adapted."""
        m = self.modules.get(target)
        if m is None:
            return None
        a = self.float32(m.a)
        b = self.float32(m.b)
        d = (b @ a) * np.float32(m.scale)
        return d.T if (m.embedding or self.fan_in_fan_out) else d

    def apply(self, target: str, raw: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        """The base tensor as stored → merged (or replaced) float32 and its dtype name."""
        if target in self.replaced:
            name = self.replaced[target]
            raw, dtype = self.float32(name), "F32"
        d = self.delta(target)
        if d is None:
            return raw, dtype
        w = to_f32(raw, dtype).astype(np.float32, copy=True)
        w += d
        return w, "F32"

    def close(self) -> None:
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass
            self._map = None


def _index(
    root: Path, config: dict[str, Any], tensors: dict[str, TensorInfo]
) -> tuple[dict[str, LoraModule], dict[str, str]]:
    modules: dict[str, LoraModule] = {}
    replaced: dict[str, str] = {}
    ranks: dict[str, int] = {}  # which saved copy of a module wins (_FULL_INFIXES)
    unknown: list[str] = []
    for name, info in tensors.items():
        if info.dtype not in FLOAT_DTYPES:
            raise AdapterError(f"{root / WEIGHTS}: tensor {name!r} is {info.dtype}, not a float")
        short = name.removeprefix(PREFIX)
        for suffix, (side, emb) in _LORA_KEYS.items():
            if short.endswith(suffix):
                mod = short[: -len(suffix)]
                target = f"{mod}.weight"
                m = modules.setdefault(target, LoraModule(mod, target, embedding=emb))
                setattr(m, side, name)
                break
        else:
            if ".lora_" in short or "lora_magnitude_vector" in short:
                unknown.append(name)
            elif short.endswith((".weight", ".bias")):
                # A module trained in full ("<m>.modules_to_save.weight"; older PEFT: "<m>.weight"),
                # else the base layer PEFT saves with a resized or LoRA'd embedding
                # ("<m>.base_layer.weight"); "<m>.original_module.*" is the base's untrained copy.
                if ".original_module." in short:
                    continue
                target, rank = short, 1
                for infix, r in _FULL_INFIXES.items():
                    if infix in short:
                        target, rank = short.replace(infix, "."), r
                if rank >= ranks.get(target, 0):
                    replaced[target], ranks[target] = name, rank
            else:
                unknown.append(name)
    if unknown:
        raise AdapterError(
            f"{root / WEIGHTS}: tensors quantkit cannot apply: {', '.join(unknown[:3])}"
            + (f" (and {len(unknown) - 3} more)" if len(unknown) > 3 else ""),
            "only plain LoRA (lora_A/lora_B) and modules_to_save are supported",
        )
    half = [m.module for m in modules.values() if not (m.a and m.b)]
    if half:
        raise AdapterError(f"{root / WEIGHTS}: lora_A or lora_B missing for {', '.join(half[:3])}")
    r0 = int(config.get("r", 8))
    alpha0 = float(config.get("lora_alpha", 8))
    rank_pat = config.get("rank_pattern") or {}
    alpha_pat = config.get("alpha_pattern") or {}
    rs = bool(config.get("use_rslora", False))
    for m in modules.values():
        rank = tensors[m.a].shape[0]
        rk = pattern_key(rank_pat, m.module)
        want = int(rank_pat[rk]) if rk is not None else r0
        if rank != want:
            raise AdapterError(
                f"{root}: {m.a} has rank {rank} but adapter_config.json says r={want} for {m.module}",
                "the adapter files are inconsistent; re-save the adapter",
            )
        ak = pattern_key(alpha_pat, m.module)
        m.rank = rank
        m.alpha = float(alpha_pat[ak]) if ak is not None else alpha0
        m.scale = m.alpha / (math.sqrt(rank) if rs else rank)
    return modules, replaced


def write_gguf_lora(adapter: LoraAdapter, arch: Any, path: Path, name: str) -> int:
    """Write the adapter as a llama.cpp GGUF LoRA (``general.type`` adapter, ``adapter.type``
    lora); returns the number of tensors.

    Layout as src/llama-adapter.cpp loads it: ``<tensor>.lora_a`` is PEFT's A ([r, in]) and
    ``<tensor>.lora_b`` is B ([out, r]); llama.cpp scales ``B A x`` by ``alpha / r`` with r
    taken per tensor from B (``llama_adapter_lora_weight::get_scale``), so the file's alpha is
    the adapter's ``lora_alpha`` and any module whose PEFT scale differs (rsLoRA's
    ``alpha / sqrt(r)``, an ``alpha_pattern`` entry) gets the ratio folded into its B. The Q/K
    row permutation llama.cpp applies to the base weights applies to B's rows only
    (permute(W + BA) = permute(B) A).
    """
    import gguf

    from quantkit.convert.writer import GGUFWriter

    alpha = float(adapter.config.get("lora_alpha", 8))
    w = GGUFWriter(path, arch.arch_name, use_temp_file=False)
    w.add_type(gguf.GGUFType.ADAPTER)
    w.add_name(name)
    w.add_string(gguf.Keys.Adapter.TYPE, "lora")
    w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    if adapter.base_name:  # which base it applies to (llama.cpp checks the architecture only)
        w.add_base_model_count(1)
        w.add_base_model_name(0, adapter.base_name)
    order = sorted(adapter.modules.values(), key=lambda m: arch.gguf_name(m.target))
    for m in order:
        gname = arch.gguf_name(m.target)
        a = adapter.float32(m.a)
        b = adapter.float32(m.b) * np.float32(m.scale / (alpha / m.rank))
        b = arch.transform(m.target, b)
        w.add_tensor(f"{gname}.lora_a", np.ascontiguousarray(a, dtype=np.float32))
        w.add_tensor(f"{gname}.lora_b", np.ascontiguousarray(b, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(order) * 2


# torch dtype name -> safetensors dtype name (what the converter understands)
TORCH_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def memory_info(name: str, t: Any) -> TensorInfo:
    """A ``TensorInfo`` for a torch tensor in memory (no file behind it)."""
    dtype = TORCH_DTYPES.get(str(t.dtype).removeprefix("torch."))
    if dtype is None:
        raise AdapterError(f"tensor {name!r} in memory is {t.dtype}, not a float")
    return TensorInfo(
        name, dtype, tuple(t.shape), Path("<memory>"), 0, t.numel() * t.element_size()
    )


def torch_to_f32(t: Any) -> np.ndarray:
    """A CPU torch tensor as float32 numpy, widened exactly as a stored tensor would be."""
    import torch

    t = t.detach().cpu()
    if t.dtype == torch.bfloat16:
        return to_f32(t.view(torch.int16).numpy().view(np.uint16), "BF16")
    return to_f32(t.numpy(), TORCH_DTYPES[str(t.dtype).removeprefix("torch.")])


# vLLM's accepted --max-lora-rank values (vllm/config/lora.py MaxLoRARanks, vLLM 0.32)
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_lora_problems(adapter: LoraAdapter) -> list[str]:
    """What vLLM's LoRA loader would refuse or silently mishandle, each named.

    vLLM applies LoRA to every linear layer and to embeddings (vllm/lora/utils.py
    ``get_supported_lora_modules``); it takes one full module only, a classification head
    (lora_model.py ``from_lora_tensors``), so a fine-tune that retrained or resized embed_tokens /
    lm_head (added tokens) cannot be served as an adapter; its vocabulary is the base's."""
    out = []
    if adapter.max_rank > VLLM_MAX_LORA_RANKS[-1]:
        out.append(
            f"rank {adapter.max_rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_LORA_RANKS[-1]})"
        )
    full = sorted(t for t in adapter.replaced if ".base_layer." not in adapter.replaced[t])
    if full:
        out.append(f"fully trained modules ({', '.join(full[:3])}) are not LoRA")
    return out


def write_vllm_lora(adapter: LoraAdapter, out: Path) -> int:
    """The adapter as a directory vLLM serves (``--enable-lora --lora-modules name=DIR``):
    adapter_config.json and adapter_model.safetensors as PEFT writes them (vLLM reads PEFT's
    format and scaling, rsLoRA included), plus ``quantkit-vllm.json`` with the smallest
    ``max_lora_rank`` that serves it. Returns the bytes written."""
    import json
    import shutil

    cfg = dict(adapter.config)
    if adapter._arrays is None:
        shutil.copyfile(adapter.path / WEIGHTS, out / WEIGHTS)
    else:
        from safetensors.torch import save_file

        save_file({k: t.contiguous() for k, t in adapter._arrays.items()}, out / WEIGHTS)
    (out / CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
    rank = next(r for r in VLLM_MAX_LORA_RANKS if r >= adapter.max_rank)
    info = {"max_lora_rank": rank, "base_model": adapter.base_name or None}
    (out / "quantkit-vllm.json").write_text(json.dumps(info, indent=2))
    return sum(p.stat().st_size for p in out.iterdir())


def save_merged(base: Path, adapter: Path, out: Path) -> None:
    """Save base + adapter merged as an HF checkpoint in ``out`` (an existing, empty folder), for
    steps that load the fine-tune in torch (imatrix collection, llm-compressor). The merge is
    PEFT's own (``merge_and_unload``), in float32; the weights are saved in the base's dtype, and
    the tokenizer (added tokens, chat template) is the adapter's when it has one."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    lora = LoraAdapter.open(adapter)
    try:
        rows = next(
            (lora.tensors[n].shape[0] for t, n in lora.replaced.items()
             if t.endswith("embed_tokens.weight")),
            None,
        )  # fmt: skip
        tok_dir = adapter if lora.has_tokenizer else base
    finally:
        lora.close()
    cfg = read_json(base / "config.json")
    dtype = str(cfg.get("dtype") or cfg.get("torch_dtype") or "float32").replace("torch.", "")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if rows is not None and rows != model.get_input_embeddings().weight.shape[0]:
        model.resize_token_embeddings(rows)  # a fine-tune that added tokens (modules_to_save)
    merged = PeftModel.from_pretrained(model, adapter).merge_and_unload()
    merged.to(getattr(torch, dtype, torch.float32))
    merged.save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(tok_dir).save_pretrained(out)
