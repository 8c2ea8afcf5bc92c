"""Llama-style decoders: Llama (1/2/3), Mistral, Qwen2, Qwen3.

Tensor lists follow transformers' modeling code for each family; GGUF names and hyper-parameter
keys follow llama.cpp's conversion/llama.py and conversion/qwen.py of the engine's version.
"""

from __future__ import annotations

from typing import ClassVar

import gguf
import numpy as np

from quantkit.convert.archs.base import (
    Architecture,
    HParams,
    TensorSpec,
    llama3_rope_factors,
    register,
)


def _q_out(h: HParams) -> int:
    return h.n_head * h.head_dim


def _kv_out(h: HParams) -> int:
    return h.n_head_kv * h.head_dim


def _untied(h: HParams) -> bool:
    return not h.tied


LAYER = "model.layers.{bid}."

# Embeddings, norms and attention every Llama-shaped decoder has, dense or MoE (shapes in HF's
# row-major order: out × in).
LLAMA_ATTN: tuple[TensorSpec, ...] = (
    TensorSpec("model.embed_tokens.weight", lambda h: (h.n_vocab, h.n_embd)),
    TensorSpec("model.norm.weight", lambda h: (h.n_embd,)),
    TensorSpec("lm_head.weight", lambda h: (h.n_vocab, h.n_embd), when=_untied),
    TensorSpec(LAYER + "input_layernorm.weight", lambda h: (h.n_embd,)),
    TensorSpec(LAYER + "self_attn.q_proj.weight", lambda h: (_q_out(h), h.n_embd)),
    TensorSpec(LAYER + "self_attn.k_proj.weight", lambda h: (_kv_out(h), h.n_embd)),
    TensorSpec(LAYER + "self_attn.v_proj.weight", lambda h: (_kv_out(h), h.n_embd)),
    TensorSpec(LAYER + "self_attn.o_proj.weight", lambda h: (h.n_embd, _q_out(h))),
    TensorSpec(LAYER + "post_attention_layernorm.weight", lambda h: (h.n_embd,)),
)

# ... and the dense gated MLP.
LLAMA_TENSORS: tuple[TensorSpec, ...] = LLAMA_ATTN + (
    TensorSpec(LAYER + "mlp.gate_proj.weight", lambda h: (h.n_ff, h.n_embd)),
    TensorSpec(LAYER + "mlp.up_proj.weight", lambda h: (h.n_ff, h.n_embd)),
    TensorSpec(LAYER + "mlp.down_proj.weight", lambda h: (h.n_embd, h.n_ff)),
)

# Optional biases (Llama's attention_bias / mlp_bias; always on for Qwen2's q/k/v).
ATTN_QKV_BIAS: tuple[TensorSpec, ...] = (
    TensorSpec(
        LAYER + "self_attn.q_proj.bias", lambda h: (_q_out(h),), when=lambda h: h.attention_bias
    ),
    TensorSpec(
        LAYER + "self_attn.k_proj.bias", lambda h: (_kv_out(h),), when=lambda h: h.attention_bias
    ),
    TensorSpec(
        LAYER + "self_attn.v_proj.bias", lambda h: (_kv_out(h),), when=lambda h: h.attention_bias
    ),
)
ATTN_O_BIAS = TensorSpec(
    LAYER + "self_attn.o_proj.bias", lambda h: (h.n_embd,), when=lambda h: h.attention_bias
)
MLP_BIAS: tuple[TensorSpec, ...] = (
    TensorSpec(LAYER + "mlp.gate_proj.bias", lambda h: (h.n_ff,), when=lambda h: h.mlp_bias),
    TensorSpec(LAYER + "mlp.up_proj.bias", lambda h: (h.n_ff,), when=lambda h: h.mlp_bias),
    TensorSpec(LAYER + "mlp.down_proj.bias", lambda h: (h.n_embd,), when=lambda h: h.mlp_bias),
)
QK_NORM: tuple[TensorSpec, ...] = (
    TensorSpec(LAYER + "self_attn.q_norm.weight", lambda h: (h.head_dim,)),
    TensorSpec(LAYER + "self_attn.k_norm.weight", lambda h: (h.head_dim,)),
)


@register
class Llama(Architecture):
    hf_architectures = ("LlamaForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.LLAMA
    # llama.cpp runs LLAMA with interleaved rotary pairs; HF checkpoints are half-split
    permute_qk = True
    tensors = LLAMA_TENSORS + ATTN_QKV_BIAS + (ATTN_O_BIAS,) + MLP_BIAS
    ROPE_FREQS: ClassVar[str] = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_rope_dimension_count(self.h.head_dim)

    def _llama3(self) -> bool:
        return str(self.h.rope.get("rope_type", "")).lower() == "llama3"

    def extra_tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        return {self.ROPE_FREQS: (self.h.head_dim // 2,)} if self._llama3() else {}

    def extra_tensor(self, name: str) -> np.ndarray:
        if name == self.ROPE_FREQS and self._llama3():
            return llama3_rope_factors(self.h.rope, self.h.head_dim)
        return super().extra_tensor(name)


@register
class Mistral(Llama):
    # llama.cpp converts MistralForCausalLM as LLAMA (conversion/__init__.py); sliding_window is
    # not a GGUF key for that arch, so it is not written (the same as llama.cpp's converter).
    hf_architectures = ("MistralForCausalLM",)


@register
class Qwen2(Architecture):
    hf_architectures = ("Qwen2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2  # NEOX rotary in llama.cpp: no Q/K permutation
    tensors = LLAMA_TENSORS + tuple(
        TensorSpec(s.hf, s.shape)
        for s in ATTN_QKV_BIAS  # Qwen2 always has q/k/v biases
    )


@register
class Qwen3(Architecture):
    hf_architectures = ("Qwen3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3
    tensors = LLAMA_TENSORS + QK_NORM + ATTN_QKV_BIAS + (ATTN_O_BIAS,)
