"""Per-tensor sensitivity: the predicted KLD each tensor adds in each candidate type.

Model (stated, then checked): the mean KLD of a quantized model is the sum of per-tensor
contributions, and a tensor's contribution is proportional to the error its quantization puts on
that layer's output, weighted by the importance matrix:

    err(t, T) = Σ_rows Σ_j imp_j · (w_ij − deq(quant_T(w))_ij)²  ≈ E_x ‖(W − Ŵ) x‖²

with imp_j = mean x_j² over the calibration tokens (what llama.cpp's quantizer weighs columns
with), and the quantize → dequantize done by llama.cpp itself (rows.py), so the error is that of
the bytes the file will hold. Tensors the matrix does not cover (token_embd, output) get uniform
weights.

The sum over rows is estimated from a stratified sample of whole rows (SAMPLE_VALUES values per
tensor, one row drawn from each of as many equal strata), with a stated relative standard error
per tensor × type: the cost is tensors × candidates, not parameters × candidates.

How much of that error reaches the output differs between kinds of tensor (a value projection
is not a gate; the tied embedding is also the output head) and between layers (the residual
stream's scale and what later layers do with an error differ by depth; a layer with activations
hundreds of times larger than the others dominates its kind's summed error), so the gain of a
tensor is a product, kind × layer: gain(t) = a[kind(t)] · b[layer(t)]. Both are fit to probes in
llama.cpp — every tensor of a kind quantized to a probe type, the rest untouched, and every
tensor of a group of consecutive layers likewise — each probe's mean KLD on calibration chunks
against the base; a and b by iterative proportional fitting, so that each probe's predicted KLD
(Σ over its tensors of a·b·err) matches the measured one. Predicted KLD(t, T) = a·b·err(t, T).
Without calibration text the gains are 1 (the raw proxy). A probe is one rewrite of the file and
one forward pass, so its cost is tokens × parameters: the tokens per probe are bounded
(PROBE_TOKEN_PARAMS) and so is the number of layer groups (LAYER_PROBE_TOKEN_PARAMS).

With the HF checkpoint the base was converted from (a family fisher.py runs), the error is
weighted per weight instead, by the Fisher of the model's own next-token distribution brought
back to each Linear's output (fisher.py):

    err(t, T) = ½ Σ_rows Σ_j F_ij · (w_ij − deq(quant_T(w))_ij)²  ≈ KLD(t, T)

which already carries what the imatrix misses — how much each output row, layer and kind
matters downstream — so only one probe per kind is left, for a[kind] (≈ 1 for most kinds; a
value projection's errors add up across the positions attention mixes, which the diagonal
misses: ≈ 4 on the embedded default's float-like copy). On that model the Fisher-weighted error
with per-kind gains ranks 24 measured single-tensor KLDs at Spearman 0.93, 23 of them within
2× (kind × layer gains on the imatrix error: 0.84); docs/cli.md has the figures and the misses. The imatrix-weighted errors are kept beside
as a second surrogate (per_kind).

Everything is cached by content: sha256 of the base file, the importance matrix, the candidate
types, the probe tokens and settings. One pass serves every budget.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import gguf
import numpy as np

from quantkit.casts import to_f32
from quantkit.checkpoint import Checkpoint
from quantkit.hashing import sha256_file
from quantkit.progress import Progress
from quantkit.quantize.gguf import ggml
from quantkit.quantize.gguf.auto import rows
from quantkit.quantize.gguf.auto.sizes import Slot
from quantkit.quantize.gguf.quantizer import QuantizeOptions
from quantkit.targets import IMATRIX_CTX

CACHE_VERSION = "5"
# Values of each tensor whose error is measured (whole rows, stratified): 2^18 is 64 rows of a
# 4096-wide tensor, 455 of a 576-wide one, so the pass costs tensors × candidates, whatever their
# size (Llama-3-8B: 65.5 M of its 8.03 G values per candidate type). Checked against the full
# measurement on the embedded default (Spearman, error bars: docs/cli.md, bench/auto.py
# --sample-check).
SAMPLE_VALUES = 1 << 18
MIN_ROWS = 32  # rows sampled at least, however wide: the error bar needs a few strata
# The llama.cpp probes cost tokens × parameters (one forward pass per kind, plus the base's):
# at most PROBE_CHUNKS chunks, fewer on a model so large that 4 chunks of 512 tokens would cost
# more than on a 2 B-parameter one (one chunk at 8 B), never fewer than one.
PROBE_TOKEN_PARAMS = 4 * 512 * 2e9
# The layer probes share a budget of tokens × parameters: every layer its own probe on the 135 M
# embedded default (30 layers, 4 × 512 tokens each), 9 groups of ~3 layers at 1.5 B, 7 groups at
# 8 B (one chunk each) — docs/cli.md has the measured cost.
LAYER_PROBE_TOKEN_PARAMS = 3e13
MIN_LAYER_GROUPS = 2
FIT_ITERATIONS = 200  # iterative proportional fitting of kind × layer gains (converges in tens)
PROBE_TYPE = "Q4_0"  # a type every 32-multiple row takes, in the range budgets land in
# when types= leaves Q4_0 out: a probe type near 4 bits first (where gains matter most)
PROBE_ORDER = (PROBE_TYPE, "Q4_K", "IQ4_NL", "IQ4_XS", "Q4_1", "Q5_0", "Q3_K", "Q5_K", "IQ3_S",
               "Q5_1", "Q6_K", "Q2_K", "Q8_0")  # fmt: skip


@dataclass
class Sensitivity:
    errors: dict[str, dict[str, float]]  # tensor -> type -> imatrix-weighted squared error
    gains: dict[str, float]  # kind -> KLD per unit of error, a[kind] (1.0: not measured)
    probe_kld: dict[str, float] = field(default_factory=dict)  # probe label -> measured KLD
    seconds: dict[str, float] = field(default_factory=dict)  # proxy / probe
    peak_rss_mib: float = 0.0
    cache_hit: bool = False
    key: str = ""
    rel_se: dict[str, dict[str, float]] = field(default_factory=dict)  # tensor -> type -> error bar
    sample: int | None = SAMPLE_VALUES  # values measured per tensor (None: all)
    probe_tokens: int = 0  # tokens each llama.cpp probe scored
    layer_gains: dict[str, float] = field(default_factory=dict)  # layer group -> b[group]
    tensor_gains: dict[str, float] = field(default_factory=dict)  # tensor -> a[kind] · b[layer]
    # "fisher": errors weighted by fisher.py's F (KLD units), gains per kind only; the
    # imatrix-weighted errors and their per-kind gains kept beside them as a second surrogate.
    # "imatrix": errors weighted by the importance matrix, gains kind × layer.
    weighting: str = "imatrix"
    imatrix_errors: dict[str, dict[str, float]] = field(default_factory=dict)
    imatrix_gains: dict[str, float] = field(default_factory=dict)

    def kld(self, slot: Slot, t: str) -> float:
        g = self.tensor_gains.get(slot.name)
        return (self.gains.get(slot.kind, 1.0) if g is None else g) * self.errors[slot.name][t]

    def per_kind(self) -> Sensitivity:
        """The importance-matrix-weighted errors with one gain per kind fit alone (no layer
        factor, no Fisher weights): a second surrogate the selection measures beside the first."""
        if self.imatrix_errors:
            return replace(self, errors=self.imatrix_errors, gains=self.imatrix_gains,
                           tensor_gains={}, imatrix_errors={}, weighting="imatrix")  # fmt: skip
        return replace(self, gains=self.kind_only, tensor_gains={})

    @property
    def kind_only(self) -> dict[str, float]:
        """Per-kind gains as one probe per kind alone gives them (KLD / Σ err of the kind)."""
        return {k[len("kind:") :]: v for k, v in self.probe_gains.items() if k.startswith("kind:")}

    probe_gains: dict[str, float] = field(default_factory=dict)  # probe label -> KLD / Σ err

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("cache_hit")
        return d


def _tensor_rows(reader: gguf.GGUFReader, name: str) -> tuple[np.ndarray, str]:
    """The tensor as a (rows × ncols) view of the memory map (nothing read yet) and its type."""
    t = next(x for x in reader.tensors if x.name == name)
    data = np.asarray(t.data)
    if t.tensor_type == gguf.GGMLQuantizationType.BF16:  # gguf-py maps BF16 as bytes
        data = data.view(np.uint16)
    return data.reshape(-1, int(t.shape[0])), t.tensor_type.name


def _as_f32(rows_: np.ndarray, base_type: str) -> np.ndarray:
    return to_f32(rows_, "BF16") if base_type == "BF16" else rows_.astype(np.float32)


def sample_rows(name: str, nrows: int, n: int) -> np.ndarray:
    """``n`` row indices, one drawn at random from each of ``n`` equal strata of the rows, seeded
    by the tensor's name (the same rows on every run); every row when ``n >= nrows``."""
    if n >= nrows:
        return np.arange(nrows)
    edges = (np.arange(n + 1) * nrows) // n
    seed = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    return edges[:-1] + (rng.random(n) * np.diff(edges)).astype(np.int64)


def rows_for(ncols: int, nrows: int, sample: int | None) -> int:
    """How many rows of a tensor are measured: ``sample`` values' worth (at least MIN_ROWS
    rows), or every row (``sample`` None, or a tensor that small)."""
    if sample is None:
        return nrows
    return min(nrows, max(MIN_ROWS, -(-sample // ncols)))


def estimate(row_err: np.ndarray, nrows: int) -> tuple[float, float]:
    """Total over all ``nrows`` rows from one sampled row per stratum, and its relative standard
    error: stratum size × Σ row errors; the variance of a one-per-stratum sample estimated from
    the differences of neighbouring strata (the collapsed-strata estimator: in expectation it
    overstates the variance where neighbouring strata differ; from 32 rows with heavy-tailed
    errors it can also understate it — bench/auto.py --sample-check measures the coverage)."""
    n = len(row_err)
    if n == nrows:
        return float(row_err.sum()), 0.0
    edges = (np.arange(n + 1) * nrows) // n
    h = np.diff(edges).astype(np.float64)
    total = float(h @ row_err)
    if n < 2 or total <= 0:
        return total, 0.0
    d2 = float(np.mean(np.diff(row_err) ** 2) / 2)  # per-stratum variance of one row
    return total, float(np.sqrt(float(h @ h) * d2)) / total


def proxy_errors(
    base: Path,
    slots: list[Slot],
    importance: dict[str, np.ndarray],
    *,
    threads: int = 1,
    sample: int | None = SAMPLE_VALUES,
    progress: Progress | None = None,
    fisher: dict[str, np.ndarray] | None = None,
) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, float]], dict[str, dict[str, float]]]:
    """err(t, T) for every quantizable tensor and candidate type (see the module doc), the
    relative standard error of each (0 where every row was measured), and the
    importance-matrix-weighted err(t, T) of the tensors ``fisher`` weighs (its F for the sampled
    rows, sampled_rows order): for those, the first is ½ Σ F_ij (w_ij − ŵ_ij)², in KLD units.

    Each tensor is read through the memory map, only its sampled rows (``sample`` values' worth;
    None: all), so memory is a few sampled rows per thread whatever the model's size. Rows are
    quantized independently by every ggml type (one row is one or more whole blocks), so a
    sampled row's error is exactly its error in the whole tensor; only the sampling is an
    estimate. Tensors run on ``threads`` threads: ggml_quantize_chunk is a ctypes call and
    releases the GIL."""
    reader = gguf.GGUFReader(base)
    todo = [s for s in slots if s.quantizable]
    for t in {t for s in todo for t in s.options}:
        rows.init(ggml.type_id(t))

    def one(s: Slot) -> tuple[Slot, dict[str, float], dict[str, float], dict[str, float]]:
        view, base_type = _tensor_rows(reader, s.name)
        nrows = view.shape[0]
        idx = sampled_rows(s, sample)
        f = (fisher or {}).get(s.name)
        w = _as_f32(view[idx], base_type)  # only these rows are read from the file
        imp = importance.get(s.name)
        n_mats = 1 if imp is None else len(imp) // s.ncols
        per_mat = nrows // n_mats
        mat = idx // per_mat  # a 3-D expert tensor: each expert with its own importance
        out: dict[str, float] = {}
        se: dict[str, float] = {}
        by_imp: dict[str, float] = {}
        for t in s.options:
            q = ggml.type_id(t)
            row_err = np.empty(len(idx), dtype=np.float64)
            row_f = np.empty(len(idx), dtype=np.float64)
            for m in np.unique(mat):
                sel = mat == m
                cols = None if imp is None else imp[m * s.ncols : (m + 1) * s.ncols]
                part = w[sel]
                d = rows.roundtrip(q, part, cols) - part
                weights = np.ones(s.ncols) if cols is None else cols.astype(np.float64)
                row_err[sel] = np.einsum("ij,ij,j->i", d, d, weights, dtype=np.float64)
                if f is not None:
                    row_f[sel] = np.einsum("ij,ij,ij->i", d, d, f[sel], dtype=np.float64)
            if f is None:
                out[t], se[t] = estimate(row_err, nrows)
            else:
                out[t], se[t] = estimate(row_f, nrows)
                by_imp[t] = estimate(row_err, nrows)[0]
        return s, out, se, by_imp

    result: dict[str, dict[str, float]] = {}
    rel_se: dict[str, dict[str, float]] = {}
    imatrix_err: dict[str, dict[str, float]] = {}
    total = sum(len(s.options) for s in todo)
    done = 0
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        futures = [pool.submit(one, s) for s in todo]
        for f in as_completed(futures):
            s, errs, se, by_imp = f.result()
            result[s.name], rel_se[s.name] = errs, se
            if by_imp:
                imatrix_err[s.name] = by_imp
            done += len(s.options)
            if progress:
                progress("sensitivity", done, total)
    order = {s.name: i for i, s in enumerate(todo)}
    result = dict(sorted(result.items(), key=lambda kv: order[kv[0]]))
    return result, {k: rel_se[k] for k in result}, imatrix_err


def sampled_rows(s: Slot, sample: int | None = SAMPLE_VALUES) -> np.ndarray:
    """The rows of ``s`` the pass measures (sample_rows of rows_for)."""
    return sample_rows(s.name, s.nrows, rows_for(s.ncols, s.nrows, sample))


def probe_type(s: Slot) -> str | None:
    """The type a tensor is probed in: PROBE_TYPE, else the first of PROBE_ORDER it takes."""
    return next((t for t in PROBE_ORDER if t in s.options), None)


def layer_groups(slots: list[Slot], n_groups: int) -> dict[str, list[Slot]]:
    """The quantizable tensors of numbered layers in ``n_groups`` runs of consecutive layers
    (as equal as the count allows), labelled ``blk.A-B``."""
    layers = sorted({s.layer for s in slots if s.quantizable and s.layer is not None})
    n = max(1, min(len(layers), n_groups))
    out: dict[str, list[Slot]] = {}
    for i in range(n):
        run = layers[(i * len(layers)) // n : ((i + 1) * len(layers)) // n]
        label = f"blk.{run[0]}" if len(run) == 1 else f"blk.{run[0]}-{run[-1]}"
        members = set(run)
        out[label] = [s for s in slots if s.quantizable and s.layer in members]
    return out


def n_layer_groups(n_layers: int, tokens: int, n_params: int) -> int:
    """Layer probes within LAYER_PROBE_TOKEN_PARAMS (at least MIN_LAYER_GROUPS, at most one per
    layer)."""
    n = int(LAYER_PROBE_TOKEN_PARAMS // max(1, tokens * n_params))
    return max(min(MIN_LAYER_GROUPS, n_layers), min(n_layers, n))


def fit_gains(
    probes: dict[str, tuple[list[Slot], float]],
    errors: dict[str, dict[str, float]],
    kind_of: dict[str, str],
    group_of: dict[str, str],
) -> tuple[dict[str, float], dict[str, float]]:
    """a[kind], b[group] with Σ_{t∈probe} a·b·err(t, probe type) = the probe's measured KLD for
    every probe, as nearly as a product allows (iterative proportional fitting; a tensor outside
    the numbered layers has b = 1). ``probes``: label ``kind:K`` / ``layer:G`` -> (tensors, KLD)."""
    a = {k[5:]: 1.0 for k in probes if k.startswith("kind:")}
    b = {k[6:]: 1.0 for k in probes if k.startswith("layer:")}

    def err(s: Slot) -> float:
        t = probe_type(s)
        return errors[s.name][t] if t is not None else 0.0

    for _ in range(FIT_ITERATIONS):
        for label, (group, kld) in probes.items():
            kind_probe = label.startswith("kind:")
            key = label[5:] if kind_probe else label[6:]
            other = sum(
                err(s) * (b.get(group_of.get(s.name, ""), 1.0) if kind_probe
                          else a.get(kind_of[s.name], 1.0))
                for s in group
            )  # fmt: skip
            if other > 0:
                (a if kind_probe else b)[key] = max(kld, 1e-12) / other
    return a, b


def calibrate_gains(
    probe: object, slots: list[Slot], errors: dict[str, dict[str, float]],
    n_groups: int = 0, progress: Progress | None = None,
) -> tuple[dict[str, float], dict[str, float], dict[str, float], dict[str, float], dict[str, float]]:  # fmt: skip
    """One llama.cpp measurement per kind of tensor and per group of layers (``n_groups``: 0
    none), each tensor in its probe type; returns the kind gains a, the layer-group gains b, each
    tensor's a·b, every probe's KLD and every probe's own KLD / Σ err."""
    kinds: dict[str, list[Slot]] = {}
    for s in slots:
        if s.quantizable and probe_type(s) is not None:
            kinds.setdefault(s.kind, []).append(s)
    todo = {f"kind:{k}": g for k, g in sorted(kinds.items())}
    groups = (
        layer_groups([s for s in slots if probe_type(s) is not None], n_groups) if n_groups else {}
    )
    todo.update({f"layer:{g}": m for g, m in groups.items()})
    probes: dict[str, tuple[list[Slot], float]] = {}
    for i, (label, group) in enumerate(todo.items()):
        kld = probe.kld({s.name: probe_type(s) for s in group}, label=label)  # type: ignore[attr-defined]
        probes[label] = (group, kld)
        if progress:
            progress("sensitivity probes", i + 1, len(todo))
    kind_of = {s.name: s.kind for s in slots}
    group_of = {s.name: g for g, m in groups.items() for s in m}
    a, b = fit_gains(probes, errors, kind_of, group_of)
    tensor_gains = {
        s.name: a.get(s.kind, 1.0) * b.get(group_of.get(s.name, ""), 1.0)
        for s in slots if s.quantizable and s.kind in a
    }  # fmt: skip
    measured = {label: kld for label, (_, kld) in probes.items()}
    own = {}
    for label, (group, kld) in probes.items():
        e = sum(errors[s.name][probe_type(s)] for s in group)  # type: ignore[index]
        own[label] = max(kld, 1e-12) / e if e > 0 else 1.0
    return a, b, tensor_gains, measured, own


def kind_gains(
    measured: dict[str, float], slots: list[Slot], errors: dict[str, dict[str, float]]
) -> dict[str, float]:
    """a[kind] = the kind probe's KLD / Σ err of its tensors in their probe types."""
    sums: dict[str, float] = {}
    for s in slots:
        t = probe_type(s) if s.quantizable else None
        if t is not None and f"kind:{s.kind}" in measured:
            sums[s.kind] = sums.get(s.kind, 0.0) + errors[s.name][t]
    return {k: max(measured[f"kind:{k}"], 1e-12) / e for k, e in sums.items() if e > 0}


def probe_budget(chunks: list[list[int]], n_params: int) -> list[list[int]]:
    """The first chunks whose llama.cpp probes stay within PROBE_TOKEN_PARAMS (at least one)."""
    if not chunks:
        return chunks
    n = int(PROBE_TOKEN_PARAMS // max(1, n_params * len(chunks[0])))
    return chunks[: max(1, n)]


def _sha256(path: Path, progress: Progress | None) -> str:
    """sha256_file with progress: hashing a 16 GB base takes tens of seconds."""
    from quantkit.hashing import BLOCK

    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with path.open("rb") as f:
        while b := f.read(BLOCK * 16):
            h.update(b)
            done += len(b)
            if progress:
                progress("sensitivity hash", done >> 20, max(1, size >> 20))
    return h.hexdigest()


def cache_key(
    base: Path, importance: dict[str, np.ndarray], slots: list[Slot], probe_tokens: object,
    sample: int | None = SAMPLE_VALUES, progress: Progress | None = None, fisher_samples: int = 0,
) -> str:  # fmt: skip
    h = hashlib.sha256(f"quantkit-auto-sensitivity {CACHE_VERSION} {PROBE_TYPE}".encode())
    h.update((_sha256(base, progress) if progress else sha256_file(base)).encode())
    for name in sorted(importance):
        h.update(name.encode())
        h.update(np.ascontiguousarray(importance[name], dtype=np.float32).tobytes())
    for s in slots:
        h.update(f"{s.name}:{','.join(s.options)};".encode())
    h.update(json.dumps(probe_tokens).encode())
    h.update(f"sample={sample} min_rows={MIN_ROWS} layers={LAYER_PROBE_TOKEN_PARAMS}".encode())
    h.update(f"fisher={fisher_samples}".encode())
    return h.hexdigest()[:32]


def cache_root() -> Path:
    from quantkit.paths import sensitivity_dir

    return sensitivity_dir()


def _peak_rss_mib() -> float:
    """This process's own peak RSS (VmHWM: in a process forked from a larger one, getrusage
    would report the parent's high-water mark)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(
    base: Path,
    slots: list[Slot],
    options: QuantizeOptions,
    *,
    probe_chunks: list[list[int]] | None = None,
    n_ctx: int = IMATRIX_CTX,
    threads: int | None = None,
    sample: int | None = SAMPLE_VALUES,
    progress: Progress | None = None,
    use_cache: bool = True,
    checkpoint: Checkpoint | None = None,
) -> Sensitivity:
    """The sensitivity of every tensor × candidate type, from the cache when present.

    ``sample``: values measured per tensor (None: every value, the full measurement the sample
    is checked against). ``probe_chunks`` are cut to the probe budget (probe_budget).
    ``checkpoint``: the HF checkpoint ``base`` was converted from (unmerged, unchanged): with
    probe chunks and a supported family, errors are Fisher-weighted (fisher.py) and the probes
    are per kind only; else importance-matrix-weighted with kind × layer probes."""
    from quantkit.atomic import cached_json
    from quantkit.quantize.gguf.auto import fisher

    importance = options.imatrix or {}
    n_params = sum(s.n_elements for s in slots)
    chunks = probe_budget(probe_chunks or [], n_params)
    use_fisher = bool(chunks) and fisher.supported(checkpoint)
    tokens = sum(len(c) for c in chunks)
    n_fisher = fisher.n_samples(tokens, n_params) if use_fisher else 0
    key = cache_key(base, importance, slots, chunks, sample, progress, n_fisher)

    def make() -> dict:
        n_threads = threads or len(os.sched_getaffinity(0))
        t0 = time.perf_counter()
        f = None
        if use_fisher:
            assert checkpoint is not None
            want = {s.name: sampled_rows(s, sample) for s in slots
                    if s.quantizable and s.layer is not None}  # fmt: skip
            f = fisher.fisher_rows(checkpoint, chunks, want, first=n_ctx // 2, samples=n_fisher,
                                   threads=n_threads, progress=progress)  # fmt: skip
            if set(f) != set(want):  # a tensor the decoder does not run as a Linear: no mixing
                f = None
        tf = time.perf_counter()
        errors, rel_se, by_imp = proxy_errors(base, slots, importance, threads=n_threads,
                                              sample=sample, progress=progress, fisher=f)  # fmt: skip
        t1 = time.perf_counter()
        gains: dict[str, float] = {}
        layer: dict[str, float] = {}
        tensor: dict[str, float] = {}
        measured: dict[str, float] = {}
        own: dict[str, float] = {}
        if chunks:
            from quantkit.quantize.gguf.auto.probe import KLDProbe

            base_type = next((s.base_type for s in slots if s.quantizable), "F16")
            probe = KLDProbe(base, chunks, options, base_type=base_type,
                             threads=n_threads, n_ctx=n_ctx, progress=progress)  # fmt: skip
            n_layers = len({s.layer for s in slots if s.quantizable and s.layer is not None})
            n_groups = 0 if f else n_layer_groups(n_layers, tokens, n_params)
            gains, layer, tensor, measured, own = calibrate_gains(
                probe, slots, errors, n_groups, progress
            )
        t2 = time.perf_counter()
        seconds = {"proxy": t1 - tf, "probe": t2 - t1}
        extra: dict = {}
        if f:
            seconds["fisher"] = tf - t0
            imatrix_errors = {n: by_imp.get(n, e) for n, e in errors.items()}
            extra = dict(weighting="fisher", imatrix_errors=imatrix_errors,
                         imatrix_gains=kind_gains(measured, slots, imatrix_errors))  # fmt: skip
        return Sensitivity(errors, gains, measured, seconds, _peak_rss_mib(), key=key,
                           rel_se=rel_se, sample=sample, probe_tokens=tokens, layer_gains=layer,
                           tensor_gains=tensor, probe_gains=own, **extra).to_json()  # fmt: skip

    d, hit = cached_json(cache_root() / f"{key}.json", make, use_cache=use_cache)
    return Sensitivity(**d, cache_hit=hit)
