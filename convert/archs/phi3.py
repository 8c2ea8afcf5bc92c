"""Phi-3 (and Phi-3.5 / Phi-4-mini, which share ``Phi3ForCausalLM``).

llama.cpp keeps Phi-3's fused projections fused (``src/models/phi3.cpp``): ``qkv_proj`` is
``attn_qkv`` (rows: queries, keys, values — the order HF splits them in) and ``gate_up_proj`` is
``ffn_up`` with 2 × n_ff rows, split by ggml_swiglu into silu(first half) · second half, which is
HF's ``gate, up = chunk(2)``. So the tensors pass through unchanged; RoPE is NEOX (no permutation).

LongRoPE ("longrope", HF's name for the older "su" and Phi's "yarn"): the per-frequency divisors
are written as the ``rope_factors_long`` / ``rope_factors_short`` tensors, and the cos/sin scale
as ``rope.scaling.attn_factor``. llama.cpp picks the long set when the context is longer than
``rope.scaling.original_context_length``; transformers when the sequence is. Keys follow
llama.cpp's ``conversion/phi.py`` (Phi3MiniModel).
"""

from __future__ import annotations

import math
from typing import ClassVar

import gguf
import numpy as np

from quantkit.convert.archs.base import Architecture, HParams, TensorSpec, register
from quantkit.convert.archs.llama import LAYER
from quantkit.errors import CheckpointError


def _qkv_out(h: HParams) -> int:
    return (h.n_head + 2 * h.n_head_kv) * h.head_dim


PHI3_TENSORS: tuple[TensorSpec, ...] = (
    TensorSpec("model.embed_tokens.weight", lambda h: (h.n_vocab, h.n_embd)),
    TensorSpec("model.norm.weight", lambda h: (h.n_embd,)),
    TensorSpec("lm_head.weight", lambda h: (h.n_vocab, h.n_embd), when=lambda h: not h.tied),
    TensorSpec(LAYER + "input_layernorm.weight", lambda h: (h.n_embd,)),
    TensorSpec(LAYER + "self_attn.qkv_proj.weight", lambda h: (_qkv_out(h), h.n_embd)),
    TensorSpec(LAYER + "self_attn.o_proj.weight", lambda h: (h.n_embd, h.n_head * h.head_dim)),
    TensorSpec(LAYER + "post_attention_layernorm.weight", lambda h: (h.n_embd,)),
    TensorSpec(LAYER + "mlp.gate_up_proj.weight", lambda h: (2 * h.n_ff, h.n_embd)),
    TensorSpec(LAYER + "mlp.down_proj.weight", lambda h: (h.n_embd, h.n_ff)),
)

# transformers' Phi3Config reads the older "su" and "yarn" as "longrope"
LONGROPE = frozenset({"longrope", "su", "yarn"})


@register
class Phi3(Architecture):
    hf_architectures = ("Phi3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.PHI3
    tensors = PHI3_TENSORS
    ROPE_LONG: ClassVar[str] = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_LONG] + ".weight"
    ROPE_SHORT: ClassVar[str] = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT] + ".weight"

    def __init__(self, config: dict) -> None:
        super().__init__(config)
        h = self.h
        problems = []
        if h.n_head * h.head_dim != h.n_embd:
            # llama.cpp's phi3 loader shapes attn_output as n_embd × n_embd
            problems.append(f"head_dim {h.head_dim} × {h.n_head} heads != hidden_size {h.n_embd}")
        act = config.get("hidden_act", "silu")
        if act != "silu":
            problems.append(f"hidden_act {act!r} (llama.cpp's phi3 graph uses SwiGLU)")
        if problems:
            raise CheckpointError(
                f"config.json: Phi3ForCausalLM with {'; '.join(problems)}",
                "llama.cpp's graph for phi3 has no way to compute it, so a GGUF of this model "
                "would give different outputs than transformers",
            )
        prf = h.rope.get("partial_rotary_factor", config.get("partial_rotary_factor"))
        self.rope_dims = int(h.head_dim * float(prf or 1.0))
        self.long_rope = str(h.rope.get("rope_type", "default")).lower() in LONGROPE
        if self.long_rope:
            for key in ("long_factor", "short_factor"):
                n = len(h.rope.get(key) or [])
                if n != self.rope_dims // 2:
                    raise CheckpointError(
                        f"config.json: rope {key} has {n} entries, expected {self.rope_dims // 2}"
                    )

    def _orig_ctx(self) -> int:
        return int(self.h.rope.get("original_max_position_embeddings") or self.h.n_ctx)

    def attn_factor(self) -> float:
        """LongRoPE's cos/sin scale as transformers computes it (_compute_longrope_parameters)."""
        rope, orig = self.h.rope, self._orig_ctx()
        if rope.get("attention_factor") is not None:
            return float(rope["attention_factor"])
        factor = float(rope.get("factor") or self.h.n_ctx / orig)
        return math.sqrt(1 + math.log(factor) / math.log(orig)) if factor > 1.0 else 1.0

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_rope_dimension_count(self.rope_dims)
        w.add_rope_scaling_orig_ctx_len(self._orig_ctx())
        # llama.cpp reads the window but runs Phi-3 without it (phi3.cpp: "Phi SWA is currently
        # disabled"); 0 marks "none", as llama.cpp's converter writes it
        w.add_sliding_window(int(self.config.get("sliding_window") or 0))
        if self.long_rope:
            w.add_rope_scaling_attn_factors(self.attn_factor())

    def write_rope(self, w: gguf.GGUFWriter) -> None:
        if self.long_rope:  # carried by the rope_factors tensors and the attn factor
            w.add_rope_freq_base(float(self.h.rope.get("rope_theta", 10000.0)))
            return
        super().write_rope(w)

    def extra_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        if not self.long_rope:
            return {}
        return {self.ROPE_LONG: (self.rope_dims // 2,), self.ROPE_SHORT: (self.rope_dims // 2,)}

    def extra_tensor(self, name: str) -> np.ndarray:
        key = {self.ROPE_LONG: "long_factor", self.ROPE_SHORT: "short_factor"}.get(name)
        if key is None or not self.long_rope:
            return super().extra_tensor(name)
        return np.asarray(self.h.rope[key], dtype=np.float32)
