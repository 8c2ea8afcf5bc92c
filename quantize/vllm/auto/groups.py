"""The units ``gptq:auto`` chooses a scheme for: one Linear, or the Linears vLLM fuses.

vLLM loads q/k/v of a layer into one ``qkv_proj`` and gate/up into one ``gate_up_proj``
(``packed_modules_mapping`` of models/llama.py, qwen2.py, ...), and its compressed-tensors
loader raises when the shards of a fused layer have different schemes ("Found different
quantization schemes for the shards of ...", compressed_tensors/utils.py
should_ignore_layer), so such shards are one group with one scheme. Every other Linear is a
group of its own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from quantkit.quantize.vllm.auto.schemes import Scheme

# vLLM's packed_modules_mapping for the dense decoders quantkit exports: fused name -> shards
FUSED: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
_SHARD_OF = {s: fused for fused, shards in FUSED.items() for s in shards}


@dataclass(frozen=True)
class Member:
    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Group:
    name: str  # e.g. model.layers.3.self_attn.qkv_proj (vLLM's name of the fused layer)
    kind: str  # the last name part: qkv_proj, o_proj, gate_up_proj, down_proj, ...
    members: tuple[Member, ...]

    @property
    def weights(self) -> int:
        return sum(m.in_features * m.out_features for m in self.members)

    def fits(self, s: Scheme) -> bool:
        return all(s.fits(m.in_features) for m in self.members)

    def cost_bits(self, s: Scheme, dtype_bits: int) -> int:
        return sum(s.cost_bits(m.out_features, m.in_features, dtype_bits) for m in self.members)


def fused_groups(layers: Sequence[tuple[str, int, int]]) -> list[Group]:
    """(name, in_features, out_features) of the Linears to plan → groups, in layer order."""
    out: dict[str, list[Member]] = {}
    for name, in_f, out_f in layers:
        parent, _, leaf = name.rpartition(".")
        fused = _SHARD_OF.get(leaf)
        key = f"{parent}.{fused}" if fused else name
        out.setdefault(key, []).append(Member(name, in_f, out_f))
    return [Group(k, k.rpartition(".")[2], tuple(v)) for k, v in out.items()]
