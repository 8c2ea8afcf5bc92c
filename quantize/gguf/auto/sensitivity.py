"""Per-tensor sensitivity: the predicted KLD each tensor adds in each candidate type.

Model (stated, then checked): the mean KLD of a quantized model is the sum of per-tensor
contributions, and a tensor's contribution is proportional to the error its quantization puts on
that layer's output, weighted by the importance matrix:

    err(t, T) = Σ_rows Σ_j imp_j · (w_ij − deq(quant_T(w))_ij)²  ≈ E_x ‖(W − Ŵ) x‖²

with imp_j = mean x_j² over the calibration tokens (what llama.cpp's quantizer weighs columns
with), and the quantize → dequantize done by llama.cpp itself (rows.py), so the error is that of
the bytes the file will hold. Tensors the matrix does not cover (token_embd, output) get uniform
weights.

How much of that error reaches the output differs between kinds of tensor (a value projection
is not a gate; the tied embedding is also the output head), so one gain per kind is measured in
llama.cpp: all tensors of a kind quantized to a probe type, the rest untouched, mean KLD on
calibration chunks against the base; gain = KLD / Σ err. Predicted KLD(t, T) = gain(kind) ·
err(t, T). Without calibration text the gains are 1 (the raw proxy).

Everything is cached by content: sha256 of the base file, the importance matrix, the candidate
types, the probe tokens and settings. One pass serves every budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from quantkit.hashing import sha256_file
from quantkit.progress import Progress
from quantkit.quantize.gguf import ggml
from quantkit.quantize.gguf.auto import rows
from quantkit.quantize.gguf.auto.sizes import Slot
from quantkit.quantize.gguf.quantizer import QuantizeOptions

CACHE_VERSION = "2"
PROBE_TYPE = "Q4_0"  # a type every 32-multiple row takes, in the range budgets land in
# when types= leaves Q4_0 out: a probe type near 4 bits first (where gains matter most)
PROBE_ORDER = (PROBE_TYPE, "Q4_K", "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "Q3_K", "Q5_K", "IQ3_S",
               "Q5_1", "Q6_K", "Q2_K", "Q8_0")  # fmt: skip


@dataclass
class Sensitivity:
    errors: dict[str, dict[str, float]]  # tensor -> type -> imatrix-weighted squared error
    gains: dict[str, float]  # kind -> KLD per unit of error (1.0: not measured)
    probe_kld: dict[str, float] = field(default_factory=dict)  # kind -> measured KLD at PROBE_TYPE
    seconds: dict[str, float] = field(default_factory=dict)  # proxy / probe
    peak_rss_mib: float = 0.0
    cache_hit: bool = False
    key: str = ""

    def kld(self, slot: Slot, t: str) -> float:
        return self.gains.get(slot.kind, 1.0) * self.errors[slot.name][t]

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cache_hit")
        return d


def _weights(reader: gguf.GGUFReader, name: str) -> np.ndarray:
    t = next(x for x in reader.tensors if x.name == name)
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:
        data = (data.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(-1, int(t.shape[0]))


def proxy_errors(
    base: Path,
    slots: list[Slot],
    importance: dict[str, np.ndarray],
    *,
    threads: int = 1,
    progress: Progress | None = None,
) -> dict[str, dict[str, float]]:
    """err(t, T) for every quantizable tensor and candidate type (see the module doc)."""
    reader = gguf.GGUFReader(base)
    todo = [s for s in slots if s.quantizable]
    for t in {t for s in todo for t in s.options}:
        rows.init(ggml.type_id(t))

    def one(s: Slot) -> tuple[str, dict[str, float]]:
        w = _weights(reader, s.name)
        imp = importance.get(s.name)
        n_mats = 1 if imp is None else len(imp) // s.ncols
        per_mat = w.shape[0] // n_mats
        out: dict[str, float] = {}
        for t in s.options:
            q = ggml.type_id(t)
            total = 0.0
            for m in range(n_mats):  # a 3-D expert tensor: each expert with its own importance
                part = w[m * per_mat : (m + 1) * per_mat]
                cols = None if imp is None else imp[m * s.ncols : (m + 1) * s.ncols]
                d = rows.roundtrip(q, part, cols) - part
                sq = np.einsum("ij,ij->j", d, d, dtype=np.float64)
                total += float(sq @ (cols if cols is not None else np.ones(s.ncols)))
            out[t] = total
        return s.name, out

    result: dict[str, dict[str, float]] = {}
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        for i, (name, errs) in enumerate(pool.map(one, todo)):
            result[name] = errs
            if progress:
                progress("sensitivity", i + 1, len(todo))
    return result


def calibrate_gains(
    probe: object, slots: list[Slot], errors: dict[str, dict[str, float]],
    progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, float]]:  # fmt: skip
    """One llama.cpp measurement per kind of tensor: gain = KLD / Σ err, all tensors of the kind
    in PROBE_TYPE (or, when the candidates exclude it, the first of PROBE_ORDER they all have)."""
    kinds: dict[str, list[Slot]] = {}
    for s in slots:
        if s.quantizable:
            kinds.setdefault(s.kind, []).append(s)
    gains, measured = {}, {}
    for i, (kind, group) in enumerate(sorted(kinds.items())):
        common = set.intersection(*(set(s.options) for s in group))
        t = next((x for x in PROBE_ORDER if x in common), None)
        if t is None:
            continue  # no type every tensor of the kind takes: gain 1 (raw error)
        kld = probe.kld({s.name: t for s in group})  # type: ignore[attr-defined]
        err = sum(errors[s.name][t] for s in group)
        measured[kind] = kld
        gains[kind] = max(kld, 1e-12) / err if err > 0 else 1.0
        if progress:
            progress("sensitivity probe", i + 1, len(kinds))
    return gains, measured


def cache_key(
    base: Path, importance: dict[str, np.ndarray], slots: list[Slot], probe_tokens: object
) -> str:
    h = hashlib.sha256(f"quantkit-auto-sensitivity {CACHE_VERSION} {PROBE_TYPE}".encode())
    h.update(sha256_file(base).encode())
    for name in sorted(importance):
        h.update(name.encode())
        h.update(np.ascontiguousarray(importance[name], dtype=np.float32).tobytes())
    for s in slots:
        h.update(f"{s.name}:{','.join(s.options)};".encode())
    h.update(json.dumps(probe_tokens).encode())
    return h.hexdigest()[:32]


def cache_root() -> Path:
    from quantkit.paths import sensitivity_dir

    return sensitivity_dir()


def measure(
    base: Path,
    slots: list[Slot],
    options: QuantizeOptions,
    *,
    probe_chunks: list[list[int]] | None = None,
    n_ctx: int = 512,
    threads: int | None = None,
    progress: Progress | None = None,
    use_cache: bool = True,
) -> Sensitivity:
    """The sensitivity of every tensor × candidate type, from the cache when present."""
    from quantkit.atomic import file_lock

    importance = options.imatrix or {}
    key = cache_key(base, importance, slots, probe_chunks or [])
    root = cache_root()
    path = root / f"{key}.json"
    if use_cache and path.is_file():
        d = json.loads(path.read_text())
        return Sensitivity(**d, cache_hit=True)
    root.mkdir(parents=True, exist_ok=True)
    with file_lock(root / f".{key}.lock"):
        if use_cache and path.is_file():  # another process measured it meanwhile
            return Sensitivity(**json.loads(path.read_text()), cache_hit=True)
        n_threads = threads or len(os.sched_getaffinity(0))
        t0 = time.perf_counter()
        errors = proxy_errors(base, slots, importance, threads=n_threads, progress=progress)
        t1 = time.perf_counter()
        gains: dict[str, float] = {}
        measured: dict[str, float] = {}
        if probe_chunks:
            from quantkit.quantize.gguf.auto.probe import KLDProbe

            base_type = next((s.base_type for s in slots if s.quantizable), "F16")
            probe = KLDProbe(base, probe_chunks, options, base_type=base_type,
                             threads=n_threads, n_ctx=n_ctx)  # fmt: skip
            gains, measured = calibrate_gains(probe, slots, errors, progress)
        t2 = time.perf_counter()
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        sens = Sensitivity(errors, gains, measured, {"proxy": t1 - t0, "probe": t2 - t1},
                           rss, key=key)  # fmt: skip
        if use_cache:
            tmp = path.with_suffix(f".tmp-{os.getpid()}")
            tmp.write_text(json.dumps(sens.to_json()))
            tmp.rename(path)
        return sens
