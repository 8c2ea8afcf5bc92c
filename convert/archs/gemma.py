"""Gemma 2 and Gemma 3 (text): Llama-shaped decoders whose differences are data.

What differs from Llama, and where llama.cpp takes it from (``src/models/gemma2.cpp`` and
``gemma3.cpp`` of the engine's version; its converter is ``conversion/gemma.py``):

- RMSNorm scales by ``1 + w`` (HF ``Gemma2RMSNorm``); llama.cpp scales by ``w``, so every norm
  weight is written with 1 added (in float32, as HF computes it).
- embeddings are scaled by ``sqrt(hidden_size)``: built into llama.cpp's graph, nothing to write.
- attention scale ``query_pre_attn_scalar ** -0.5``: llama.cpp has no key for it and hard-codes
  ``1/sqrt(head_dim)`` (``1/sqrt(n_embd / n_head)`` for the 27B layer counts). Where the two
  differ, the ratio is folded into the query projection (Gemma 2) or the query norm (Gemma 3,
  whose queries are normalised after projection); RoPE is linear, so this is exact.
- soft-capping of attention scores (Gemma 2) and of the final logits: GGUF keys.
- sliding-window layers: the window and the per-layer pattern (from ``layer_types``, written as a
  bool array so any pattern round-trips); Gemma 3's local layers have their own RoPE base.
- post-attention / post-feed-forward norms, q/k norms (Gemma 3), GELU-tanh gated MLP, tied
  embeddings: mapped by gguf-py's ``TensorNameMap``.

Settings llama.cpp's graph cannot express are refused in the preflight, all at once, rather than
converted into a file that silently computes something else.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import gguf
import numpy as np

from quantkit.casts import to_f32
from quantkit.convert.archs.base import Architecture, TensorSpec, register
from quantkit.convert.archs.llama import LAYER, LLAMA_TENSORS, QK_NORM
from quantkit.errors import CheckpointError

GEMMA_NORMS: tuple[TensorSpec, ...] = (
    TensorSpec(LAYER + "pre_feedforward_layernorm.weight", lambda h: (h.n_embd,)),
    TensorSpec(LAYER + "post_feedforward_layernorm.weight", lambda h: (h.n_embd,)),
)

# HF's hidden_activation names for the tanh approximation of GELU, which llama.cpp's
# LLM_FFN_GELU computes (ggml_gelu); erf-GELU ("gelu") would differ.
GELU_TANH = frozenset({"gelu_pytorch_tanh", "gelu_new", "gelu_fast"})

# A soft-cap far above any score: tanh(x/c)·c = x·(1 − x²/3c²), the identity to float precision.
# Used where HF's config disables a cap that llama.cpp's Gemma 2 graph always applies.
NO_CAP = 1.0e6


class _Gemma(Architecture):
    """What Gemma 2 and 3 share; subclasses set the data below."""

    default_tied = True
    tensors = LLAMA_TENSORS + GEMMA_NORMS
    # HF config-class defaults for keys a config.json may omit (key absent → default;
    # key present and null → None, as transformers reads it)
    defaults: ClassVar[dict[str, Any]] = {}
    # layers in the model size llama.cpp treats as "27B" (scale 1/sqrt(n_embd/n_head)), from
    # load_arch_hparams in src/models/gemma{2,3}.cpp
    wide_scale_layers: ClassVar[int] = 0
    # HF's sliding_window_pattern default when config.json has no layer_types
    default_pattern: ClassVar[int] = 2

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        problems = self.unsupported()
        if problems:
            raise CheckpointError(
                f"config.json: {self.hf_architectures[0]} with {'; '.join(problems)}",
                "llama.cpp's graph for this architecture has no way to compute it, so a GGUF "
                "of this model would give different outputs than transformers",
            )
        self.sliding = self._layer_types()
        self.q_fix = self._query_scale_fix()

    def get(self, key: str) -> Any:
        return self.config[key] if key in self.config else self.defaults.get(key)

    def unsupported(self) -> list[str]:
        out = []
        act = self.config.get("hidden_activation") or self.config.get("hidden_act")
        if act is not None and act not in GELU_TANH:
            out.append(f"hidden_activation {act!r} (llama.cpp computes GELU with tanh)")
        if self.h.attention_bias:
            out.append("attention_bias (llama.cpp's Gemma graph has no output-projection bias)")
        if self.config.get("use_bidirectional_attention"):
            out.append("use_bidirectional_attention (an embedding model, not a causal LM)")
        return out

    def _layer_types(self) -> list[bool]:
        """Per layer: True where attention is sliding-window (HF ``layer_types``)."""
        n = self.h.n_layer
        types = self.config.get("layer_types")
        if types is not None:
            bad = sorted({t for t in types if t not in ("sliding_attention", "full_attention")})
            if len(types) != n or bad:
                raise CheckpointError(
                    f"config.json: layer_types has {len(types)} entries for {n} layers"
                    + (f" and unknown kinds {bad}" if bad else "")
                )
            sliding = [t == "sliding_attention" for t in types]
        else:  # older configs: a period, the last layer of each period global (HF's rule)
            pattern = int(self.config.get("sliding_window_pattern") or self.default_pattern)
            sliding = [bool((i + 1) % pattern) for i in range(n)]
        return sliding if self.get("sliding_window") else [False] * n

    def _query_scale_fix(self) -> float:
        """HF's attention scale over llama.cpp's built-in one (1.0 for the released models)."""
        h = self.h
        hf = float(self.get("query_pre_attn_scalar") or h.head_dim) ** -0.5
        wide = h.n_layer == self.wide_scale_layers
        engine = 1.0 / math.sqrt(h.n_embd // h.n_head if wide else h.head_dim)
        return hf / engine

    # -- tensors ---------------------------------------------------------------------------------
    def scaled_query_tensors(self) -> tuple[str, ...]:
        """HF name suffixes that carry the query scale fix (see the module docstring)."""
        return ("self_attn.q_proj.weight",)

    def transform_raw(self, hf_name: str, raw: np.ndarray, dtype: str) -> tuple[np.ndarray, str]:
        is_norm = hf_name.endswith("norm.weight")
        scaled = self.q_fix != 1.0 and hf_name.endswith(self.scaled_query_tensors())
        if not (is_norm or scaled):
            return raw, dtype
        data = to_f32(raw, dtype)
        if is_norm:
            # Gemma RMSNorm: x̂ · (1 + w), computed in float32 by HF
            data = data + np.float32(1.0)
        if scaled:
            data = data * np.float32(self.q_fix)
        return data, "F32"

    # -- metadata --------------------------------------------------------------------------------
    def write_swa(self, w: gguf.GGUFWriter) -> None:
        if any(self.sliding):
            w.add_sliding_window(int(self.get("sliding_window")))
        # read by llama.cpp's load_swa_pattern as a per-layer array
        w.add_sliding_window_pattern(self.sliding)


@register
class Gemma2(_Gemma):
    hf_architectures = ("Gemma2ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA2
    # transformers' Gemma2Config defaults
    defaults: ClassVar[dict[str, Any]] = {
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": 50.0,
        "final_logit_softcapping": 30.0,
        "sliding_window": 4096,
    }
    wide_scale_layers = 46
    default_pattern = 2

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if not self.h.tied:
            # llama.cpp's gemma2 loads no output tensor: the logits always use token_embd
            out.append(
                "untied lm_head (llama.cpp's Gemma 2 always ties the output to the embeddings)"
            )
        return out

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        for key, add in (
            ("attn_logit_softcapping", w.add_attn_logit_softcapping),
            ("final_logit_softcapping", w.add_final_logit_softcapping),
        ):
            cap = self.get(key)
            add(float(cap) if cap else NO_CAP)  # llama.cpp's graph caps always
        self.write_swa(w)


@register
class Gemma3(_Gemma):
    hf_architectures = ("Gemma3ForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.GEMMA3
    tensors = _Gemma.tensors + QK_NORM
    # transformers' Gemma3TextConfig defaults
    defaults: ClassVar[dict[str, Any]] = {
        "query_pre_attn_scalar": 256,
        "attn_logit_softcapping": None,
        "final_logit_softcapping": None,
        "sliding_window": 4096,
        "rope_local_base_freq": 10000.0,
    }
    wide_scale_layers = 62
    default_pattern = 6

    def unsupported(self) -> list[str]:
        out = super().unsupported()
        if self.get("attn_logit_softcapping") is not None:
            out.append("attn_logit_softcapping (llama.cpp's Gemma 3 graph does not cap scores)")
        local = self._local_rope()
        if str(local.get("rope_type", "default")) != "default":
            out.append(
                f"rope scaling {local.get('rope_type')!r} on sliding layers "
                "(llama.cpp scales only the global layers' RoPE)"
            )
        return out

    def _local_rope(self) -> dict[str, Any]:
        params = self.config.get("rope_parameters") or {}
        return dict(params.get("sliding_attention") or {})

    def scaled_query_tensors(self) -> tuple[str, ...]:
        # queries are RMS-normalised after the projection: the scale goes into the norm weight
        return ("self_attn.q_norm.weight",)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        cap = self.get("final_logit_softcapping")
        if cap:
            w.add_final_logit_softcapping(float(cap))
        if any(self.sliding):
            base = self._local_rope().get("rope_theta") or self.get("rope_local_base_freq")
            w.add_rope_freq_base_swa(float(base))
            self.write_swa(w)
