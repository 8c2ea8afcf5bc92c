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
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.quantize.vllm.auto.groups import Group
from quantkit.quantize.vllm.auto.schemes import Scheme

CACHE_VERSION = "2"
# probe scheme of a kind: the first of these every group of the kind may take (4-bit first:
# where budgets land), float never (it has no error to scale)
PROBE_ORDER = ("w4g64", "w4g32", "w4g128", "w8g64", "w8g128", "w8g32", "fp8")
PROBE_SAMPLES = 4  # calibration samples the per-kind KLD is measured on
# Values of each Linear whose error is measured (whole output rows, stratified), as gguf:auto's
# pass does (its SAMPLE_VALUES; 2^18 is 64 rows of a 4096-wide Linear); None: every row.
SAMPLE_VALUES = 1 << 18
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
    rel_se: dict[str, dict[str, float]] = field(
        default_factory=dict
    )  # group -> scheme -> error bar
    sample: int | None = SAMPLE_VALUES  # values measured per Linear (None: all)

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


def importance(
    model: Any, names: Sequence[str], ids: np.ndarray, progress: Progress | None = None
) -> dict[str, Any]:
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
                if progress:
                    progress("sensitivity: calibrate", i + 1, len(ids))
    finally:
        for h in handles:
            h.remove()
    return {"imp": {n: (v / count[0]).float() for n, v in sums.items()}, "ref": ref}


def mean_kld(
    model: Any, ids: np.ndarray, ref: list[Any], progress: Progress | None = None, label: str = ""
) -> float:
    """Mean KLD(float ‖ model) per token over the probe samples."""
    import torch

    total, n = 0.0, 0
    with torch.no_grad():
        for i, (row, p) in enumerate(zip(ids, ref, strict=False)):
            q = torch.log_softmax(model(torch.as_tensor(row[None, :])).logits[0].float(), -1)
            total += float((p.exp() * (p - q)).sum())
            n += p.shape[0]
            if progress:
                progress(f"probe {label} calibrate", i + 1, min(len(ids), len(ref)))
    return total / max(n, 1)


# -- the measurement -----------------------------------------------------------------------------


def proxy_errors(
    model: Any, groups: Sequence[Group], options: dict[str, list[Scheme]],
    imp: dict[str, Any], scale_dtype: Any, progress: Progress | None = None,
    sample: int | None = SAMPLE_VALUES,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]:  # fmt: skip
    """err(g, S) for every group and candidate scheme, and its relative standard error.

    Every scheme quantizes each output row on its own (int groups run along a row's inputs, FP8
    scales are per row), so the error of a stratified sample of rows is exact for those rows
    and estimates the whole Linear with a stated error bar (the sampling of gguf:auto's pass):
    the cost is groups × schemes × ``sample`` values, not parameters × schemes."""
    import torch

    from quantkit.quantize.gguf.auto.sensitivity import estimate, rows_for, sample_rows

    modules = dict(model.named_modules())
    out: dict[str, dict[str, float]] = {}
    rel_se: dict[str, dict[str, float]] = {}
    total = sum(len(options[g.name]) for g in groups)
    done = 0
    for g in groups:
        errs: dict[str, float] = {}
        ses: dict[str, float] = {}
        picked = []
        for m in g.members:
            w = modules[m.name].weight.detach()
            n_out, n_in = w.shape
            idx = sample_rows(m.name, n_out, rows_for(n_in, n_out, sample))
            picked.append((m.name, n_out, w[torch.as_tensor(idx)].float()))
        for s in options[g.name]:
            tot, var = 0.0, 0.0
            for name, n_out, w in picked:
                d = roundtrip(w, s, scale_dtype) - w
                row_err = ((d * d) @ imp[name].to(d.dtype)).double().numpy()
                t, rel = estimate(row_err, n_out)
                tot += t
                var += (rel * t) ** 2
            errs[s.name] = tot
            ses[s.name] = var**0.5 / tot if tot > 0 else 0.0
        out[g.name], rel_se[g.name] = errs, ses
        done += len(options[g.name])
        if progress:
            progress("sensitivity", done, total)
    return out, rel_se


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
            kld = mean_kld(model, ids, ref, progress, kind)
        finally:
            restore(model, saved)
        err = sum(errors[g.name][name] for g in gs)
        measured[kind], probed[kind] = kld, name
        gains[kind] = max(kld, 1e-12) / err if err > 0 else 1.0
        if progress:
            progress("sensitivity probes", i + 1, len(by_kind))
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


def cache_key(
    model_dir: Path, ids: np.ndarray, options: dict[str, list[Scheme]],
    sample: int | None = SAMPLE_VALUES,
) -> str:  # fmt: skip
    h = hashlib.sha256(f"quantkit-vllm-auto-sensitivity {CACHE_VERSION} sample={sample}".encode())
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
    sample: int | None = SAMPLE_VALUES,
) -> Sensitivity:
    """err and gains for every group × candidate scheme, from the cache when present
    (``sample``: values measured per Linear; None: all of them)."""
    from quantkit.atomic import cached_json

    key = cache_key(model_dir, ids, options, sample)

    def make() -> dict:
        import torch

        torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
        scale_dtype = getattr(torch, dtype, torch.bfloat16)
        t0 = time.perf_counter()
        model = load_model(model_dir)
        names = [m.name for g in groups for m in g.members]
        stats = importance(model, names, ids, progress)
        t1 = time.perf_counter()
        errors, rel_se = proxy_errors(model, groups, options, stats["imp"], scale_dtype, progress,
                                      sample)  # fmt: skip
        t2 = time.perf_counter()
        probe_ids = ids[:PROBE_SAMPLES]
        gains, measured, probed = probe_gains(
            model, groups, options, errors, probe_ids, stats["ref"], scale_dtype, progress
        )
        t3 = time.perf_counter()
        return Sensitivity(errors, gains, measured, probed,
                           {"activations": t1 - t0, "proxy": t2 - t1, "probe": t3 - t2},
                           key=key, rel_se=rel_se, sample=sample).to_json()  # fmt: skip

    d, hit = cached_json(cache_root() / f"{key}.json", make, use_cache=use_cache)
    return Sensitivity(**d, cache_hit=hit)
