"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE (with its shared expert), Qwen3-MoE.

HF checkpoints store one 2-D matrix per expert (``...experts.{xid}.w1.weight``); llama.cpp wants
one 3-D tensor per layer and projection (``blk.N.ffn_gate_exps.weight``, ne = {n_embd, n_ff_exp,
n_expert}), the experts stacked along the slowest axis, as llama.cpp's converter builds them
(conversion/llama.py LlamaModel.modify_tensors, conversion/qwen.py Qwen2MoeModel). Each stacked
tensor is planned with its sources and built while streaming, one at a time, so peak memory is
the largest stacked tensor, not the model.

Router weights (``ffn_gate_inp``) stay F32 in every file type, as llama.cpp's converter keeps
them (conversion/base.py prepare_tensors) and its quantizer never quantizes them.

What llama.cpp's graphs hard-code (src/models/*.cpp ``build_moe_ffn``), checked in preflight so
that a checkpoint that would run differently is refused rather than converted wrong:

- LLAMA with experts (Mixtral) and QWEN3MOE renormalise the top-k routing weights; QWEN2MOE does
  not. Qwen's ``norm_topk_prob`` must agree.
- Every layer is a MoE layer: Qwen's ``decoder_sparse_step`` must be 1 and ``mlp_only_layers``
  empty (llama.cpp has no dense layers in these graphs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import gguf

from quantkit.convert.archs.base import (
    Architecture,
    HParams,
    PlannedTensor,
    TensorSpec,
    first_key,
    register,
)
from quantkit.convert.archs.llama import (
    ATTN_QKV_BIAS,
    LAYER,
    LLAMA_ATTN,
    QK_NORM,
    Llama,
)
from quantkit.errors import CheckpointError, UnsupportedArchitectureError


@dataclass(frozen=True)
class MoEHParams(HParams):
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0  # per-expert intermediate size
    n_ff_shexp: int = 0  # shared expert's intermediate size (Qwen2-MoE), 0 when none


@dataclass(frozen=True)
class ExpertSpec:
    """One projection of every expert: ``hf`` names expert ``{xid}`` of layer ``{bid}``;
    ``merged`` is the name gguf-py's TensorNameMap knows for the stacked tensor."""

    hf: str
    merged: str
    shape: Any  # HParams -> per-expert (rows, cols), HF order
    role: str  # "gate" | "up" | "down": which product of the expert MLP it is (imatrix hooks)


# The attention and norms every one of these families has: the Llama ones.
ATTN = LLAMA_ATTN


def _gate_up(h: MoEHParams) -> tuple[int, int]:
    return (h.n_ff_exp, h.n_embd)


def _down(h: MoEHParams) -> tuple[int, int]:
    return (h.n_embd, h.n_ff_exp)


class MoEArchitecture(Architecture):
    """A decoder whose feed-forward is a routed set of experts."""

    expert_tensors: ClassVar[tuple[ExpertSpec, ...]] = ()
    # config keys, first present wins (transformers 5 writes num_local_experts for every family;
    # Qwen checkpoints made with transformers 4 say num_experts)
    expert_count_keys: ClassVar[tuple[str, ...]] = ("num_local_experts", "num_experts")
    expert_ff_keys: ClassVar[tuple[str, ...]] = ("moe_intermediate_size", "intermediate_size")
    # what llama.cpp's graph does with the top-k weights; None: the family has no such switch
    renormalises_topk: ClassVar[bool | None] = None

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        base = HParams.from_config(config, default_tied=self.default_tied)
        n_expert = first_key(config, self.expert_count_keys)
        n_used = first_key(config, ("num_experts_per_tok",))
        if not n_expert or not n_used:
            raise CheckpointError(
                "config.json: a MoE model needs "
                f"{self.expert_count_keys[0]!r} and 'num_experts_per_tok'"
            )
        if not 0 < int(n_used) <= int(n_expert):
            raise CheckpointError(
                f"config.json: num_experts_per_tok={n_used} is not in 1..{n_expert} experts"
            )
        self.h = MoEHParams(
            **base.__dict__,
            n_expert=int(n_expert),
            n_expert_used=int(n_used),
            n_ff_exp=int(first_key(config, self.expert_ff_keys)),
            n_ff_shexp=int(config.get("shared_expert_intermediate_size") or 0),
        )
        self.check_routing()

    def check_routing(self) -> None:
        c = self.config
        problems = []
        if self.renormalises_topk is not None:
            norm = bool(c.get("norm_topk_prob", False))
            if norm != self.renormalises_topk:
                problems.append(
                    f"norm_topk_prob={str(norm).lower()}, but llama.cpp's {self.arch_name} graph "
                    f"{'always' if self.renormalises_topk else 'never'} renormalises the top-k "
                    "routing weights"
                )
        if int(c.get("decoder_sparse_step") or 1) != 1 or c.get("mlp_only_layers"):
            problems.append(
                "some layers are dense (decoder_sparse_step / mlp_only_layers), "
                f"which llama.cpp's {self.arch_name} graph does not have"
            )
        if problems:
            raise UnsupportedArchitectureError(
                "config.json: " + "; ".join(problems),
                "the GGUF would not compute what the checkpoint computes; "
                "llama.cpp's own converter would write the same file",
            )

    # -- tensors ---------------------------------------------------------------------------------
    def _experts(self) -> dict[str, list[str]]:
        """HF name of each stacked tensor (as TensorNameMap knows it) -> its per-expert sources."""
        out: dict[str, list[str]] = {}
        for spec in self.expert_tensors:
            for bid in range(self.h.n_layer):
                out[spec.merged.format(bid=bid)] = [
                    spec.hf.format(bid=bid, xid=x) for x in range(self.h.n_expert)
                ]
        return out

    def expected(self) -> dict[str, tuple[int, ...]]:
        out = super().expected()
        shapes = {
            spec.merged.format(bid=b): spec.shape(self.h)
            for spec in self.expert_tensors
            for b in range(self.h.n_layer)
        }
        for merged, sources in self._experts().items():
            for s in sources:
                out[s] = shapes[merged]
        return out

    def plan_tensors(self, expected: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
        stacked = self._experts()
        per_expert = {s for sources in stacked.values() for s in sources}
        plan = super().plan_tensors({n: s for n, s in expected.items() if n not in per_expert})
        for merged, sources in stacked.items():
            name = self.gguf_name(merged)
            shape = (len(sources), *expected[sources[0]])
            plan.append(PlannedTensor(name, shape, None, False, sources=tuple(sources)))
        return plan

    @staticmethod
    def keeps_f32(gguf_name: str, shape: tuple[int, ...]) -> bool:
        # router weights stay F32 (llama.cpp conversion/base.py: FFN_GATE_INP, FFN_GATE_INP_SHEXP)
        return Architecture.keeps_f32(gguf_name, shape) or ".ffn_gate_inp" in gguf_name

    # -- the model in torch (imatrix collection) --------------------------------------------------
    # transformers 5 fuses each layer's experts into one module (gate_up_proj, down_proj) and, for
    # Mixtral, names modules differently from the checkpoint it reads and writes
    TORCH_EXPERTS: ClassVar[str] = LAYER + "mlp.experts"
    TORCH_RENAMES: ClassVar[tuple[tuple[str, str], ...]] = ()  # (torch, checkpoint) fragments

    def torch_experts_module(self, bid: int) -> str:
        return self.TORCH_EXPERTS.format(bid=bid)

    def checkpoint_name(self, torch_name: str) -> str:
        for a, b in self.TORCH_RENAMES:
            torch_name = torch_name.replace(a, b)
        return torch_name

    # -- metadata --------------------------------------------------------------------------------
    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_count(self.h.n_expert)
        w.add_expert_used_count(self.h.n_expert_used)


MIXTRAL_EXPERTS: tuple[ExpertSpec, ...] = tuple(
    ExpertSpec(
        LAYER + f"block_sparse_moe.experts.{{xid}}.{w}.weight",
        f"layers.{{bid}}.feed_forward.experts.{w}.weight",  # llama.cpp's merged name
        shape,
        role,
    )
    for w, shape, role in (("w1", _gate_up, "gate"), ("w2", _down, "down"), ("w3", _gate_up, "up"))
)

QWEN_EXPERTS: tuple[ExpertSpec, ...] = tuple(
    ExpertSpec(
        LAYER + f"mlp.experts.{{xid}}.{w}.weight",
        LAYER + f"mlp.experts.{w}.weight",  # llama.cpp's merged name
        shape,
        role,
    )
    for w, shape, role in (
        ("gate_proj", _gate_up, "gate"),
        ("up_proj", _gate_up, "up"),
        ("down_proj", _down, "down"),
    )
)


def _router(prefix: str) -> TensorSpec:
    return TensorSpec(LAYER + prefix + "gate.weight", lambda h: (h.n_expert, h.n_embd))


@register
class Mixtral(MoEArchitecture, Llama):
    # llama.cpp converts MixtralForCausalLM as LLAMA with experts (conversion/llama.py); its
    # graph renormalises the top-k weights, as transformers' MixtralTopKRouter does, always.
    hf_architectures = ("MixtralForCausalLM",)
    tensors = ATTN + (_router("block_sparse_moe."),)
    expert_tensors = MIXTRAL_EXPERTS
    expert_ff_keys = ("intermediate_size",)
    TORCH_RENAMES = ((".mlp.gate.", ".block_sparse_moe.gate."),)


@register
class Qwen3Moe(MoEArchitecture):
    hf_architectures = ("Qwen3MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN3MOE
    tensors = ATTN + QK_NORM + ATTN_QKV_BIAS + (_router("mlp."),)
    expert_tensors = QWEN_EXPERTS
    renormalises_topk = True  # src/models/qwen3moe.cpp: build_moe_ffn(..., norm_w = true, ...)

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_feed_forward_length(self.h.n_ff_exp)


def _qkv_bias(h: HParams) -> bool:
    return h.attention_bias


@register
class Qwen2Moe(MoEArchitecture):
    hf_architectures = ("Qwen2MoeForCausalLM",)
    gguf_arch = gguf.MODEL_ARCH.QWEN2MOE
    tensors = (
        ATTN
        + tuple(TensorSpec(s.hf, s.shape, when=_qkv_bias) for s in ATTN_QKV_BIAS)
        + (
            _router("mlp."),
            TensorSpec(LAYER + "mlp.shared_expert_gate.weight", lambda h: (1, h.n_embd)),
            TensorSpec(LAYER + "mlp.shared_expert.gate_proj.weight", lambda h: (h.n_ff_shexp, h.n_embd)),
            TensorSpec(LAYER + "mlp.shared_expert.up_proj.weight", lambda h: (h.n_ff_shexp, h.n_embd)),
            TensorSpec(LAYER + "mlp.shared_expert.down_proj.weight", lambda h: (h.n_embd, h.n_ff_shexp)),
        )
    )  # fmt: skip
    expert_tensors = QWEN_EXPERTS
    renormalises_topk = False  # src/models/qwen2moe.cpp: build_moe_ffn(..., norm_w = false, ...)

    def __init__(self, config: dict[str, Any]) -> None:
        # Qwen2-MoE's q/k/v always carry biases (transformers 5 names the switch qkv_bias)
        config = {**config, "attention_bias": config.get("qkv_bias", True)}
        super().__init__(config)
        if not self.h.n_ff_shexp:
            raise CheckpointError("config.json: Qwen2-MoE needs 'shared_expert_intermediate_size'")
        if self.h.tied:
            raise UnsupportedArchitectureError(
                "config.json: tied embeddings, which llama.cpp's QWEN2MOE does not load "
                "(it requires output.weight)"
            )

    def transform(self, hf_name: str, data):  # type: ignore[no-untyped-def]
        if hf_name.endswith("mlp.shared_expert_gate.weight"):
            return data.reshape(-1)  # llama.cpp loads ffn_gate_inp_shexp as {n_embd}
        return super().transform(hf_name, data)

    def plan_tensors(self, expected: dict[str, tuple[int, ...]]) -> list[PlannedTensor]:
        plan = super().plan_tensors(expected)
        for pt in plan:  # the shared-expert gate is written 1-D (see transform)
            if pt.source is not None and pt.source.endswith("mlp.shared_expert_gate.weight"):
                pt.shape, pt.keep_f32 = (pt.shape[-1],), True
        return plan

    def write_hparams(self, w: gguf.GGUFWriter) -> None:
        super().write_hparams(w)
        w.add_expert_feed_forward_length(self.h.n_ff_exp)
        w.add_expert_shared_feed_forward_length(self.h.n_ff_shexp)
