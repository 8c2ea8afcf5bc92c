"""The architecture registry: one class per HF architecture, its tensors and hyper-parameters as data.

A class says (1) which HF ``architectures`` names it handles, (2) the llama.cpp ``MODEL_ARCH`` it
writes, (3) the tensors a checkpoint must have, with their shapes as functions of the config,
(4) the GGUF keys it writes, and (5) any transform of a tensor on its way (the Q/K row
permutation for Llama-style rotary). Names are mapped with gguf-py's ``TensorNameMap`` so that
this file and llama.cpp agree on them by construction.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import gguf
import numpy as np

from quantkit import schemas
from quantkit.errors import CheckpointError, UnsupportedArchitectureError

REGISTRY: dict[str, type[Architecture]] = {}


def register(cls: type[Architecture]) -> type[Architecture]:
    for name in cls.hf_architectures:
        REGISTRY[name] = cls
    return cls


def supported() -> list[str]:
    return sorted(REGISTRY)


def first_key(config: dict[str, Any], keys: Iterable[str], default: Any = None) -> Any:
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


@dataclass(frozen=True)
class HParams:
    """The hyper-parameters every decoder-only family here shares, read once from config.json."""

    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_vocab: int
    n_ctx: int
    rms_eps: float
    tied: bool
    attention_bias: bool
    mlp_bias: bool
    rope: dict[str, Any]  # rope_theta, rope_type, factor, ... (transformers 4 and 5 styles merged)

    @classmethod
    def from_config(cls, config: dict[str, Any], *, default_tied: bool = False) -> HParams:
        def need(*keys: str) -> Any:
            v = first_key(config, keys)
            if v is None:
                raise CheckpointError(f"config.json: missing {keys[0]!r}")
            return v

        n_embd = int(need("hidden_size"))
        n_head = int(need("num_attention_heads"))
        head_dim = config.get("head_dim") or n_embd // n_head
        # transformers 5 writes rope_parameters {rope_theta, rope_type, ...}; transformers 4 wrote
        # rope_theta at top level and rope_scaling {type|rope_type, factor, ...}.
        rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
        rope = dict(rope.get("full_attention", rope))
        if "rope_type" not in rope and "type" in rope:
            rope["rope_type"] = rope["type"]
        if "rope_theta" not in rope and config.get("rope_theta") is not None:
            rope["rope_theta"] = config["rope_theta"]
        if "original_max_position_embeddings" not in rope and config.get(
            "original_max_position_embeddings"
        ):
            rope["original_max_position_embeddings"] = config["original_max_position_embeddings"]
        return cls(
            n_embd=n_embd,
            n_layer=int(need("num_hidden_layers")),
            n_head=n_head,
            n_head_kv=int(first_key(config, ["num_key_value_heads"], n_head)),
            head_dim=int(head_dim),
            n_ff=int(need("intermediate_size")),
            n_vocab=int(need("vocab_size")),
            n_ctx=int(first_key(config, ["max_position_embeddings"], 2048)),
            rms_eps=float(first_key(config, ["rms_norm_eps"], 1e-6)),
            tied=bool(config.get("tie_word_embeddings", default_tied)),
            attention_bias=bool(config.get("attention_bias", False)),
            mlp_bias=bool(config.get("mlp_bias", False)),
            rope=rope,
        )


Shape = Callable[[HParams], tuple[int, ...]]


@dataclass(frozen=True)
class TensorSpec:
    """One tensor an architecture expects, as HF names it (``{bid}`` = layer index)."""

    hf: str
    shape: Shape  # HF (row-major) shape
    when: Callable[[HParams], bool] = lambda h: True

    @property
    def per_layer(self) -> bool:
        return "{bid}" in self.hf


@dataclass
class PlannedTensor:
    """A tensor of the output file: its GGUF name and where its data comes from."""

    name: str  # GGUF name
    shape: tuple[int, ...]  # numpy (row-major) shape
    source: str | None  # HF tensor name, or None for a tensor the architecture computes
    keep_f32: bool  # norms, biases and other 1-D tensors stay F32 whatever the file type
    # several HF tensors stacked along a new first axis, in order (MoE experts -> one 3-D tensor)
    sources: tuple[str, ...] = ()


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder Q/K rows from HF's half-split rotary layout to llama.cpp's interleaved pairs.

    HF Llama rotates (x[i], x[i + d/2]); llama.cpp's LLAMA rope type rotates (x[2i], x[2i+1]).
    Same transform as llama.cpp's convert (LlamaModel.permute), applied to weights and biases.
    """
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class Architecture:
    """Base class: a Llama-shaped decoder. Subclasses change data, rarely code."""

    hf_architectures: ClassVar[tuple[str, ...]] = ()
    gguf_arch: ClassVar[gguf.MODEL_ARCH]
    permute_qk: ClassVar[bool] = False
    default_tied: ClassVar[bool] = False
    tensors: ClassVar[tuple[TensorSpec, ...]] = ()
    # HF tensor names that carry no weights llama.cpp needs (buffers some checkpoints save)
    ignored_suffixes: ClassVar[tuple[str, ...]] = ("rotary_emb.inv_freq",)

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.h = HParams.from_config(config, default_tied=self.default_tied)
        self.name_map = gguf.get_tensor_name_map(self.gguf_arch, self.h.n_layer)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]

    # -- tensors ---------------------------------------------------------------------------------
    def expected(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor name this config needs, with its shape."""
        out: dict[str, tuple[int, ...]] = {}
        for spec in self.tensors:
            if not spec.when(self.h):
                continue
            shape = spec.shape(self.h)
            if spec.per_layer:
                for bid in range(self.h.n_layer):
                    out[spec.hf.format(bid=bid)] = shape
            else:
                out[spec.hf] = shape
        return out

    def gguf_name(self, hf_name: str) -> str:
        name = self.name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise CheckpointError(f"no GGUF name for tensor {hf_name!r} of {self.arch_name}")
        return name

    def plan(self, available: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
        """Check the checkpoint's tensors against the config and order the output tensors.

        Lists every missing and mis-shaped tensor at once (preflight), then returns the plan.
        """
        expected = self.expected()
        missing = [n for n in expected if n not in available]
        misshaped = [
            f"{n} is {list(available[n])}, expected {list(s)}"
            for n, s in expected.items()
            if n in available and tuple(available[n]) != s
        ]
        problems = []
        if missing:
            more = f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""
            problems.append(f"missing tensors: {', '.join(missing[:5])}{more}")
        if misshaped:
            more = f" (+{len(misshaped) - 5} more)" if len(misshaped) > 5 else ""
            problems.append(f"mis-shaped tensors: {'; '.join(misshaped[:5])}{more}")
        if problems:
            raise CheckpointError(
                "; ".join(problems),
                "the weights do not match config.json — check that the checkpoint is complete",
            )
        plan = self.plan_tensors(expected)
        for name, shape in self.extra_tensor_shapes().items():
            plan.append(PlannedTensor(name, shape, None, True))
        return plan

    def plan_tensors(self, expected: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
        """One output tensor per checkpoint tensor (MoE classes stack experts instead)."""
        plan = []
        for hf_name, shape in expected.items():
            name = self.gguf_name(hf_name)
            plan.append(PlannedTensor(name, shape, hf_name, self.keeps_f32(name, shape)))
        return plan

    def unused(self, available: Iterable[str]) -> list[str]:
        """Checkpoint tensors the plan does not use (reported, not fatal: e.g. a tied lm_head)."""
        expected = self.expected()
        return [n for n in available if n not in expected and not n.endswith(self.ignored_suffixes)]

    @staticmethod
    def keeps_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
        # llama.cpp's converter keeps 1-D tensors and norms in F32 (conversion/base.py
        # prepare_tensors: "Most of the codebase that takes in 1D tensors or norms only handles F32")
        return len(shape) <= 1 or gguf_name.endswith("_norm.weight")

    def transform_raw(self, hf_name: str, raw: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        """The tensor as stored (``dtype`` is its safetensors dtype; BF16 arrives as uint16)
        → the array to write and its dtype. Layout-only transforms (``transform``) work on any
        dtype; an arithmetic one (Gemma's norm offset) widens with ``to_f32`` first."""
        return self.transform(hf_name, raw), dtype

    def transform(self, hf_name: str, data: np.ndarray) -> np.ndarray:
        if self.permute_qk:
            if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
                return permute_rotary(data, self.h.n_head)
            if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
                return permute_rotary(data, self.h.n_head_kv)
        return data

    def extra_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Tensors the architecture computes from the config (e.g. llama3 rope factors)."""
        return {}

    def extra_tensor(self, name: str) -> np.ndarray:
        raise KeyError(name)

    # -- metadata --------------------------------------------------------------------------------
    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        h = self.h
        w.add_block_count(h.n_layer)
        w.add_context_length(h.n_ctx)
        w.add_embedding_length(h.n_embd)
        w.add_feed_forward_length(h.n_ff)
        w.add_head_count(h.n_head)
        w.add_head_count_kv(h.n_head_kv)
        w.add_layer_norm_rms_eps(h.rms_eps)
        w.add_vocab_size(h.n_vocab)
        if self.config.get("head_dim") is not None:
            w.add_key_length(h.head_dim)
            w.add_value_length(h.head_dim)
        self.write_rope(w)

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        rope = self.h.rope
        if rope.get("rope_theta") is not None:
            w.add_rope_freq_base(float(rope["rope_theta"]))
        kind = ROPE_SCALING.get(str(rope.get("rope_type", "default")).lower())
        if kind is None:
            raise UnsupportedArchitectureError(
                f"config.json: rope scaling type {rope.get('rope_type')!r} is not supported",
                f"supported: {', '.join(sorted(ROPE_SCALING))}",
            )
        kind(w, rope, self.h)


def _rope_none(w: gguf.GGUFWriter, rope: dict[str, Any], h: HParams) -> None:
    pass


def _rope_linear(w: gguf.GGUFWriter, rope: dict[str, Any], h: HParams) -> None:
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(float(rope["factor"]))


def _rope_yarn(w: gguf.GGUFWriter, rope: dict[str, Any], h: HParams) -> None:
    # keys as llama.cpp's convert writes them (conversion/base.py TextModel.set_gguf_parameters)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(float(rope["factor"]))
    orig = rope.get("original_max_position_embeddings")
    if orig is None:
        raise CheckpointError(
            "config.json: yarn rope scaling without original_max_position_embeddings"
        )
    w.add_rope_scaling_orig_ctx_len(int(orig))
    for key, add in (
        ("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
        ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
        ("attn_factor", w.add_rope_scaling_yarn_attn_factor),
        ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
        ("beta_slow", w.add_rope_scaling_yarn_beta_slow),
    ):
        if rope.get(key) is not None:
            add(float(rope[key]))


def _rope_llama3(w: gguf.GGUFWriter, rope: dict[str, Any], h: HParams) -> None:
    pass  # carried by the rope_freqs tensor (see llama3_rope_factors)


# rope_type (HF) -> writer of llama.cpp keys. "default" is plain RoPE.
ROPE_SCALING: dict[str, Callable[[gguf.GGUFWriter, dict[str, Any], HParams], None]] = {
    "default": _rope_none,
    "linear": _rope_linear,
    "yarn": _rope_yarn,
    "llama3": _rope_llama3,
}


def llama3_rope_factors(rope: dict[str, Any], head_dim: int) -> np.ndarray:
    """Per-frequency divisors for llama3 rope scaling, as llama.cpp reads them from rope_freqs.

    Formula from Meta's Llama 3.1 reference (also transformers' _compute_llama3_parameters).
    """
    base = float(rope.get("rope_theta", 10000.0))
    factor = float(rope.get("factor", 8.0))
    low = float(rope.get("low_freq_factor", 1.0))
    high = float(rope.get("high_freq_factor", 4.0))
    old_ctx = float(rope.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    freqs = 1.0 / (base ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim))
    out = []
    for f in freqs:
        wavelen = 2 * math.pi / float(f)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, dtype=np.float32)


def resolve(config: dict[str, Any], path: Path | str = "config.json") -> Architecture:
    """The registered class for ``config``'s architecture, built from it. The config is checked
    against its schema (quantkit/schemas.py) only once the architecture is known to be
    supported: an unsupported family is refused for that, whatever its other keys hold."""
    archs = config.get("architectures") or []
    if not isinstance(archs, list) or not archs:
        raise UnsupportedArchitectureError(
            "config.json: no 'architectures' entry",
            f"quantkit converts: {', '.join(supported())}",
        )
    for name in archs:
        cls = REGISTRY.get(name)
        if cls is not None:
            schemas.check("config.json", config, path)
            return cls(config)
    if config.get("auto_map"):
        raise UnsupportedArchitectureError(
            f"config.json: architecture {archs[0]!r} needs custom code from the model folder (auto_map)",
            "quantkit never runs code shipped with a model; supported: " + ", ".join(supported()),
        )
    raise UnsupportedArchitectureError(
        f"config.json: architecture {archs[0]!r} is not supported",
        f"natively supported: {', '.join(supported())}; `quantkit archs` also lists those "
        "llama.cpp's own converter handles (--converter auto|upstream)",
    )
