"""Repack a compressed-tensors W{4,8}A16 checkpoint into the legacy ``gptq`` / ``awq`` layouts.

The integer weights, scales and zero points come unchanged from llm-compressor's output; only
their storage changes, so a legacy checkpoint dequantizes to exactly the same float weights
(tests/test_vllm_export.py checks this). Layouts, as vLLM's loaders read them
(vllm/model_executor/layers/quantization/gptq.py, awq.py and, on CPU, cpu_wna16.py):

compressed-tensors ``pack-quantized`` (compressed_tensors/compressors/quantized_compressors/
pack_quantized.py): ``weight_packed`` int32 [out, in·b/32], values stored as ``q + 2^(b-1)``
(q signed) in consecutive b-bit fields from the low bits up along the input dim;
``weight_scale`` [out, groups]; ``weight_zero_point`` (asymmetric only) int32 packed the same
way along the *output* dim, [ceil(out·b/32), groups]; ``weight_g_idx`` [in] with act-order
"group"; ``weight_shape`` [2]. Float weight = (q − zp) · scale.

gptq (AutoGPTQ, checkpoint_format "gptq", i.e. v1): ``qweight`` int32 [in·b/32, out] packed
along the input dim; ``qzeros`` int32 [groups, out·b/32] packed along the output dim and stored
as *zero − 1* (the v1 convention; vLLM's gptq kernels add the 1 back); ``scales`` [groups, out];
``g_idx`` int32 [in] (group of every input channel). Unsigned values: q_u = q + 2^(b-1).

awq (AutoAWQ GEMM): ``qweight`` int32 [in, out/8] packed along the output dim in the
interleaved order [0, 2, 4, 6, 1, 3, 5, 7] (field k of a word holds column AWQ_ORDER[k] of its
8-column block; vLLM's awq loaders undo it with (0, 4, 1, 5, 2, 6, 3, 7)); ``qzeros`` [groups,
out/8] packed the same way, no −1; ``scales`` [groups, out]. 4 bits only.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import InputError

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # AutoAWQ GEMM: column stored in field k of a word


@dataclass(frozen=True)
class IntLayer:
    """One quantized Linear, unpacked: signed q [out, in], zero points and scales [out, groups],
    g_idx [in] (group of each input channel)."""

    q: Any  # torch.int8/int16 [out, in]
    zero: Any  # torch int [out, groups] (zeros when symmetric)
    scale: Any  # float [out, groups]
    g_idx: Any  # torch.int32 [in]
    bits: int
    group: int  # -1: one group per row (channel-wise)
    has_g_idx: bool  # act-order "group": g_idx is not simply arange(in) // group
    # weight[o, i] = (q[o, i] − zero[o, g_idx[i]]) · scale[o, g_idx[i]]


# -- bit packing ---------------------------------------------------------------------------------


def _pack_fields(fields, bits: int):
    """[..., pf] unsigned values → int32 [...]: field k at bits k·b (low bits first)."""
    import torch

    out = torch.zeros(fields.shape[:-1], dtype=torch.int64)
    for k in range(fields.shape[-1]):
        out |= (fields[..., k].to(torch.int64) & ((1 << bits) - 1)) << (bits * k)
    return _to_int32(out)


def pack_rows(u, bits: int):
    """Pack unsigned values [n, m] along dim 0 into int32 [n·bits/32, m] (field k = row k)."""
    pf = 32 // bits
    n, m = u.shape
    if n % pf:
        raise InputError(f"cannot pack {n} rows in {pf}-value words")
    return _pack_fields(u.reshape(n // pf, pf, m).transpose(1, 2), bits)


def pack_cols(u, bits: int, order: tuple[int, ...] | None = None):
    """Pack unsigned values [n, m] along dim 1 into int32 [n, m·bits/32]; ``order[k]`` is the
    column of each block of 32/bits columns that goes into field k (identity by default)."""
    pf = 32 // bits
    n, m = u.shape
    if m % pf:
        raise InputError(f"cannot pack {m} columns in {pf}-value words")
    blocks = u.reshape(n, m // pf, pf)
    if order is not None:
        blocks = blocks[:, :, list(order)]
    return _pack_fields(blocks, bits)


def unpack_rows(packed, bits: int, n: int | None = None):
    """Inverse of ``pack_rows``: int32 [w, m] → unsigned int64 [w·32/bits, m] (first n rows)."""
    import torch

    pf = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    out = torch.stack([(p >> (bits * k)) & mask for k in range(pf)], dim=1)
    out = out.reshape(-1, packed.shape[1])
    return out if n is None else out[:n]


def unpack_cols(packed, bits: int, m: int | None = None, order: tuple[int, ...] | None = None):
    """Inverse of ``pack_cols``: int32 [n, w] → unsigned int64 [n, w·32/bits] (first m cols)."""
    import torch

    pf = 32 // bits
    mask = (1 << bits) - 1
    p = packed.to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(p >> (bits * k)) & mask for k in range(pf)], dim=2)  # [n, w, pf]
    if order is not None:
        cols = torch.empty_like(fields)
        cols[:, :, list(order)] = fields
        fields = cols
    out = fields.reshape(packed.shape[0], -1)
    return out if m is None else out[:, :m]


def _to_int32(x):
    import torch

    x = x & 0xFFFFFFFF
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


# -- reading compressed-tensors ------------------------------------------------------------------


def weights_args(qcfg: dict[str, Any]) -> dict[str, Any]:
    """The one weight scheme of a compressed-tensors config (quantkit writes one group)."""
    groups = list((qcfg.get("config_groups") or {}).values())
    if len(groups) != 1 or not groups[0].get("weights"):
        raise InputError("expected one quantization group with integer weights")
    return groups[0]["weights"]


def read_int_layer(tensors: dict[str, Any], prefix: str, w: dict[str, Any]) -> IntLayer:
    """Unpack ``prefix.weight_packed`` & co. (compressed-tensors pack-quantized) to an IntLayer."""
    import torch

    bits = int(w["num_bits"])
    off = 1 << (bits - 1)
    out_f, in_f = (int(v) for v in tensors[f"{prefix}.weight_shape"].tolist())
    q = unpack_cols(tensors[f"{prefix}.weight_packed"], bits, in_f) - off
    scale = tensors[f"{prefix}.weight_scale"]
    if scale.ndim == 1:
        scale = scale[:, None]
    n_groups = scale.shape[1]
    zp_t = tensors.get(f"{prefix}.weight_zero_point")
    if w.get("symmetric", True) or zp_t is None:
        zero = torch.zeros(out_f, n_groups, dtype=torch.int64)
    elif zp_t.dtype == torch.int32 and zp_t.shape[0] != out_f:
        zero = unpack_rows(zp_t, bits, out_f) - off  # packed along the output dim
    else:
        zero = zp_t.to(torch.int64).reshape(out_f, n_groups)
    group = int(w.get("group_size") or -1) if w.get("strategy") == "group" else -1
    gi = tensors.get(f"{prefix}.weight_g_idx")
    if gi is not None:
        g_idx = gi.to(torch.int32)
    else:
        g_idx = (
            torch.arange(in_f, dtype=torch.int32) // group
            if group > 0
            else torch.zeros(in_f, dtype=torch.int32)
        )
    return IntLayer(q, zero, scale, g_idx, bits, group, gi is not None)


# -- writing the legacy layouts ------------------------------------------------------------------


def gptq_tensors(layer: IntLayer, dtype) -> dict[str, Any]:
    """AutoGPTQ v1 tensors of one layer (names without the module prefix)."""
    import torch

    off = 1 << (layer.bits - 1)
    q_u = (layer.q + off).t().contiguous()  # [in, out]
    zeros_v1 = (layer.zero.t() + off - 1) & ((1 << layer.bits) - 1)  # v1: zero − 1, wraps 0→15
    return {
        "qweight": pack_rows(q_u, layer.bits),
        "qzeros": pack_cols(zeros_v1.contiguous(), layer.bits),
        "scales": layer.scale.t().contiguous().to(dtype),
        "g_idx": layer.g_idx.to(torch.int32).contiguous(),
    }


def awq_tensors(layer: IntLayer, dtype) -> dict[str, Any]:
    """AutoAWQ GEMM tensors of one layer."""
    if layer.bits != 4 or layer.has_g_idx:
        raise InputError("the awq layout holds 4-bit weights without act-order only")
    off = 1 << (layer.bits - 1)
    return {
        "qweight": pack_cols((layer.q + off).t().contiguous(), 4, AWQ_ORDER),
        "qzeros": pack_cols((layer.zero + off).t().contiguous(), 4, AWQ_ORDER),
        "scales": layer.scale.t().contiguous().to(dtype),
    }


def legacy_dtype(config: dict[str, Any]):
    """Float dtype of the legacy checkpoint: vLLM's gptq/awq kernels take fp16/bf16 activations
    only (cpu_wna16.py get_supported_act_dtypes), and AutoGPTQ/AutoAWQ wrote fp16: a float32
    model becomes float16, fp16/bf16 stay."""
    import torch

    name = str(config.get("dtype") or config.get("torch_dtype") or "float16")
    return torch.bfloat16 if name == "bfloat16" else torch.float16


def repack(src: Path, dst: Path, method: str) -> dict[str, Any]:
    """Write the legacy ``method`` ("gptq" or "awq") checkpoint of compressed-tensors ``src``
    into the (new) folder ``dst``; returns the legacy quantization_config."""
    from safetensors.torch import load_file, save_file

    config = json.loads((src / "config.json").read_text())
    qcfg = config.get("quantization_config") or {}
    if qcfg.get("quant_method") != "compressed-tensors" or qcfg.get("format") != "pack-quantized":
        raise InputError(
            f"{src}: not a pack-quantized compressed-tensors checkpoint",
            "the legacy layouts hold integer (W4A16/W8A16) weights: use gptq or awq targets",
        )
    w = weights_args(qcfg)
    bits = int(w["num_bits"])
    group = int(w.get("group_size") or -1) if w.get("strategy") == "group" else -1
    dtype = legacy_dtype(config)
    dst.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():  # tokenizer, generation config, chat template, ...
        if (
            f.is_file()
            and f.suffix != ".safetensors"
            and f.name
            not in (
                "config.json",
                "model.safetensors.index.json",
                "recipe.yaml",
            )
        ):
            shutil.copy2(f, dst / f.name)

    desc_act = False
    quantized: list[str] = []
    weight_map: dict[str, str] = {}
    for shard in sorted(src.glob("*.safetensors")):
        t = load_file(shard)
        out: dict[str, Any] = {}
        prefixes = [k[: -len(".weight_packed")] for k in t if k.endswith(".weight_packed")]
        for p in prefixes:
            layer = read_int_layer(t, p, w)
            desc_act |= layer.has_g_idx
            make = gptq_tensors if method == "gptq" else awq_tensors
            for k, v in make(layer, dtype).items():
                out[f"{p}.{k}"] = v
            quantized.append(p)
        packed_names = {f"{p}.{s}" for p in prefixes for s in _CT_SUFFIXES}
        for k, v in t.items():
            if k in packed_names:
                continue
            out[k] = v.to(dtype) if v.is_floating_point() else v
        save_file(out, str(dst / shard.name), metadata={"format": "pt"})
        weight_map.update({k: shard.name for k in out})
        del t, out
    if (src / "model.safetensors.index.json").is_file():
        total = sum(f.stat().st_size for f in dst.glob("*.safetensors"))
        (dst / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
        )

    if method == "gptq":
        legacy = {
            "quant_method": "gptq",
            "checkpoint_format": "gptq",  # v1: qzeros hold zero − 1
            "bits": bits,
            "group_size": group,
            "desc_act": desc_act,
            "sym": bool(w.get("symmetric", True)),
            "lm_head": False,
            "true_sequential": True,
            "damp_percent": None,
        }
    else:
        legacy = {
            "quant_method": "awq",
            "version": "gemm",
            "bits": bits,
            "group_size": group,
            "zero_point": True,  # sym weights are written with zero 8 (vLLM's CPU awq asserts it)
            "modules_to_not_convert": _not_converted(config, quantized),
        }
    legacy = {k: v for k, v in legacy.items() if v is not None}
    config["quantization_config"] = legacy
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    # AutoGPTQ/AutoAWQ also wrote it beside config.json; some loaders look there first.
    (dst / "quantize_config.json").write_text(json.dumps(legacy, indent=2) + "\n")
    return legacy


_CT_SUFFIXES = (
    "weight_packed",
    "weight_scale",
    "weight_zero_point",
    "weight_g_idx",
    "weight_shape",
)


def _not_converted(config: dict[str, Any], quantized: list[str]) -> list[str] | None:
    """Decoder-layer Linear modules left in float (from ``--ignore``), for vLLM's awq loader."""
    ignore = (config.get("quantization_config") or {}).get("ignore") or []
    names = sorted({n for n in ignore if n != "lm_head" and not n.startswith("re:")})
    return names or None
