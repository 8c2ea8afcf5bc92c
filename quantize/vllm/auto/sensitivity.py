"""Per-group sensitivity: the predicted KLD each fused group adds in each candidate scheme.

Model (the one quantize/gguf/auto/sensitivity.py uses for GGUF, here in torch): a group's
contribution is proportional to the error its quantization puts on its layers' outputs,
weighted by the calibration activations,

    err(g, S) = Σ_{Linear ∈ g} Σ_j imp_j · Σ_i (w_ij − deq(quant_S(w))_ij)²  ≈ E_x ‖(W − Ŵ) x‖²

with imp_j = mean x_j² of the Linear's input over the calibration tokens (an importance
matrix), and quant → dequant the round-to-nearest of compressed-tensors' own arithmetic
(quantization/utils/helpers.py calculate_qparams: symmetric int scale = max|w| / ((2^N − 1)/2)
per group, values clamped to [−2^(N−1), 2^(N−1) − 1]; FP8 scale = max|w| / 448 per output
channel, cast to float8_e4m3fn). GPTQ lowers the error below round-to-nearest, by similar
factors across groups, so the ranking is what matters (bench/vllm_auto.py measures it against
the KLD of each group quantized alone: Spearman in docs/cli.md).

How much of a layer's output error reaches the logits differs by kind (a value projection is
not a down projection), so one gain per kind is measured: every group of the kind in a probe
scheme, the rest in float, mean KLD of the transformers logits against the float model on the
calibration samples; gain = KLD / Σ err. Predicted KLD(g, S) = gain(kind) · err(g, S).

Cached by content (model files, calibration ids, groups and candidates) under the quantkit
cache; one pass serves every budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.quantize.vllm.auto.groups import Group
from quantkit.quantize.vllm.auto.schemes import Scheme

CACHE_VERSION = "1"
# probe scheme of a kind: the first of these every group of the kind may take (4-bit first:
# where budgets land), float never (it has no error to scale)
PROBE_ORDER = ("w4g64", "w4g32", "w4g128", "w8g64", "w8g128", "w8g32", "fp8")
PROBE_SAMPLES = 4  # calibration samples the per-kind KLD is measured on
FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
Progress = Callable[[str, int, int], None]


@dataclass
class Sensitivity:
    errors: dict[str, dict[str, float]]  # group -> scheme -> activation-weighted squared error
    gains: dict[str, float]  # kind -> predicted KLD per unit of error
    probe_kld: dict[str, float] = field(default_factory=dict)  # kind -> measured KLD
    probe_scheme: dict[str, str] = field(default_factory=dict)  # kind -> scheme probed
    seconds: dict[str, float] = field(default_factory=dict)
    cache_hit: bool = False
    key: str = ""

    def kld(self, group: Group, scheme: str) -> float:
        return self.gains.get(group.kind, 1.0) * self.errors[group.name][scheme]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("cache_hit")
        return d


# -- quantize → dequantize, compressed-tensors' round to nearest ---------------------------------


def roundtrip(w: Any, s: Scheme, scale_dtype: Any) -> Any:
    """``w`` (float32 [out, in]) through scheme ``s`` and back; scales rounded to the
    checkpoint's dtype as they are stored."""
    import torch

    if s.kind == "float":
        return w
    if s.kind == "fp8":
        scale = (w.abs().amax(dim=1, keepdim=True) / FP8_MAX).to(scale_dtype).float()
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = (w / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).float()
        return q * scale
    out_f, in_f = w.shape
    group = s.group or in_f  # int8 (W8A8): one scale per output channel
    g = w.reshape(out_f, in_f // group, group)
    qmax, qmin = 2 ** (s.bits - 1) - 1, -(2 ** (s.bits - 1))
    scale = (g.abs().amax(dim=2, keepdim=True) / ((qmax - qmin) / 2)).to(scale_dtype).float()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(g / scale), qmin, qmax)
    return (q * scale).reshape(out_f, in_f)


# -- the model and its calibration statistics ----------------------------------------------------


def load_model(model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


def importance(model: Any, names: Sequence[str], ids: np.ndarray) -> dict[str, Any]:
    """mean x_j² of each named Linear's input over every calibration token; also returns the
    float model's log-probs of the first PROBE_SAMPLES samples (the probe's reference)."""
    import torch

    modules = dict(model.named_modules())
    sums: dict[str, Any] = {}
    count = [0]

    def hook(name: str) -> Callable[..., None]:
        def f(_m: Any, inp: tuple[Any, ...], _out: Any) -> None:
            x = inp[0].detach().reshape(-1, inp[0].shape[-1]).float()
            sq = (x * x).sum(dim=0, dtype=torch.float64)
            sums[name] = sq if name not in sums else sums[name] + sq

        return f

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    ref = []
    try:
        with torch.no_grad():
            for i, row in enumerate(ids):
                logits = model(torch.as_tensor(row[None, :])).logits[0]
                count[0] += row.shape[0]
                if i < PROBE_SAMPLES:
                    ref.append(torch.log_softmax(logits.float(), dim=-1))
    finally:
        for h in handles:
            h.remove()
    return {"imp": {n: (v / count[0]).float() for n, v in sums.items()}, "ref": ref}


def mean_kld(model: Any, ids: np.ndarray, ref: list[Any]) -> float:
    """Mean KLD(float ‖ model) per token over the probe samples."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for row, p in zip(ids, ref, strict=False):
            q = torch.log_softmax(model(torch.as_tensor(row[None, :])).logits[0].float(), -1)
            total += float((p.exp() * (p - q)).sum())
            n += p.shape[0]
    return total / max(n, 1)


# -- the measurement -----------------------------------------------------------------------------


def proxy_errors(
    model: Any, groups: Sequence[Group], options: dict[str, list[Scheme]],
    imp: dict[str, Any], scale_dtype: Any, progress: Progress | None = None,
) -> dict[str, dict[str, float]]:  # fmt: skip
    modules = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    for i, g in enumerate(groups):
        errs: dict[str, float] = {}
        for s in options[g.name]:
            total = 0.0
            for m in g.members:
                w = modules[m.name].weight.detach().float()
                d = roundtrip(w, s, scale_dtype) - w
                total += float(((d * d).sum(dim=0) * imp[m.name]).sum())
            errs[s.name] = total
        out[g.name] = errs
        if progress:
            progress("sensitivity", i + 1, len(groups))
    return out


def set_scheme(model: Any, groups: Sequence[Group], s: Scheme | None, scale_dtype: Any) -> dict:
    """Put ``groups`` in scheme ``s`` (round to nearest) in place; returns the weights to
    restore. ``s`` None: nothing changes."""
    modules = dict(model.named_modules())
    saved = {}
    for g in groups:
        for m in g.members:
            p = modules[m.name].weight
            saved[m.name] = p.detach().clone()
            if s is not None:
                p.data.copy_(roundtrip(p.detach().float(), s, scale_dtype))
    return saved


def restore(model: Any, saved: dict) -> None:
    modules = dict(model.named_modules())
    for name, w in saved.items():
        modules[name].weight.data.copy_(w)


def probe_gains(
    model: Any, groups: Sequence[Group], options: dict[str, list[Scheme]],
    errors: dict[str, dict[str, float]], ids: np.ndarray, ref: list[Any], scale_dtype: Any,
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, str]]:  # fmt: skip
    by_kind: dict[str, list[Group]] = {}
    for g in groups:
        by_kind.setdefault(g.kind, []).append(g)
    gains, measured, probed = {}, {}, {}
    for i, (kind, gs) in enumerate(sorted(by_kind.items())):
        common = set.intersection(*({s.name for s in options[g.name]} for g in gs))
        name = next((n for n in PROBE_ORDER if n in common), None)
        if name is None:
            continue  # only float offered: no error to scale
        s = next(s for s in options[gs[0].name] if s.name == name)
        saved = set_scheme(model, gs, s, scale_dtype)
        try:
            kld = mean_kld(model, ids, ref)
        finally:
            restore(model, saved)
        err = sum(errors[g.name][name] for g in gs)
        measured[kind], probed[kind] = kld, name
        gains[kind] = max(kld, 1e-12) / err if err > 0 else 1.0
        if progress:
            progress("sensitivity probe", i + 1, len(by_kind))
    return gains, measured, probed


def model_digest(model_dir: Path) -> str:
    """sha256 over the model's config and weight files (names and bytes)."""
    h = hashlib.sha256()
    for f in sorted(model_dir.iterdir()):
        if f.suffix in (".safetensors", ".json") and f.name.startswith(("model", "config")):
            h.update(f.name.encode())
            with open(f, "rb") as fh:
                while chunk := fh.read(1 << 24):
                    h.update(chunk)
    return h.hexdigest()


def cache_key(model_dir: Path, ids: np.ndarray, options: dict[str, list[Scheme]]) -> str:
    h = hashlib.sha256(f"quantkit-vllm-auto-sensitivity {CACHE_VERSION}".encode())
    h.update(model_digest(model_dir).encode())
    h.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
    for name, opts in options.items():
        h.update(f"{name}:{','.join(s.name for s in opts)};".encode())
    return h.hexdigest()[:32]


def cache_root() -> Path:
    from quantkit.paths import vllm_sensitivity_dir

    return vllm_sensitivity_dir()


def measure(
    model_dir: Path,
    groups: Sequence[Group],
    options: dict[str, list[Scheme]],
    ids: np.ndarray,
    *,
    dtype: str = "bfloat16",
    threads: int | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> Sensitivity:
    """err and gains for every group × candidate scheme, from the cache when present."""
    from quantkit.atomic import file_lock

    key = cache_key(model_dir, ids, options)
    root = cache_root()
    path = root / f"{key}.json"
    if use_cache and path.is_file():
        return Sensitivity(**json.loads(path.read_text()), cache_hit=True)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key}.lock"):
        if use_cache and path.is_file():  # another process measured it meanwhile
            return Sensitivity(**json.loads(path.read_text()), cache_hit=True)
        import torch

        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        scale_dtype = getattr(torch, dtype, torch.bfloat16)
        t0 = time.perf_counter()
        model = load_model(model_dir)
        names = [m.name for g in groups for m in g.members]
        stats = importance(model, names, ids)
        t1 = time.perf_counter()
        errors = proxy_errors(model, groups, options, stats["imp"], scale_dtype, progress)
        t2 = time.perf_counter()
        probe_ids = ids[:PROBE_SAMPLES]
        gains, measured, probed = probe_gains(
            model, groups, options, errors, probe_ids, stats["ref"], scale_dtype, progress
        )
        t3 = time.perf_counter()
        sens = Sensitivity(errors, gains, measured, probed,
                           {"activations": t1 - t0, "proxy": t2 - t1, "probe": t3 - t2},
                           key=key)  # fmt: skip
        if use_cache:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(sens.to_json()))
            tmp.rename(path)
        return sens
