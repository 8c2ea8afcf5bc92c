"""One engine, one model, one process: ``python -m quantkit.validate.worker JOB.json``.

The harness writes a job file, starts this module in a fresh process (stdout/stderr go to a log
file whose tail ends up in the report when something fails) and waits with a timeout. The worker
writes ``result.json`` next to the job; progress goes to ``progress`` (``done total`` per line).

Roles:
- ``reference``: score every chunk, store the log-probs of the scored positions in the reference
  cache directory (``logprobs.npy``) and the reference's own PPL in ``result.json``.
- ``artifact``: audit the file (GGUF), compare the engine's tokenization with the reference ids,
  score every chunk against the cached reference log-probs, run the speed test.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.atomic import write_json
from quantkit.text import read_text

REF_F32_LIMIT = 256 * 2**20  # reference log-probs up to this size are stored in float32


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _progress(job: dict[str, Any], stage: str, done: int, total: int) -> None:
    with open(Path(job["dir"]) / "progress", "a") as f:
        f.write(f"{stage} {done} {total}\n")
    if not job.get("in_process"):  # in the caller's process (MemoryEngine) nothing is printed
        print(f"[worker] {stage} {done}/{total}", file=sys.stderr, flush=True)


def token_mismatch_share(ref: list[int], got: list[int], limit: int = 20000) -> float:
    """Share of reference tokens the engine does not reproduce (0.0 when identical); large texts
    are compared on their first ``limit`` tokens."""
    if ref == got:
        return 0.0
    import difflib

    a, b = ref[:limit], got[:limit]
    sm = difflib.SequenceMatcher(None, a, b, autojunk=False)
    matched = sum(m.size for m in sm.get_matching_blocks())
    return 1.0 - matched / max(len(a), len(b), 1)


def tokenization(job: dict[str, Any], ids: list[int], adds_bos: bool) -> dict[str, Any]:
    """The engine's own tokenization of the text (``ids``, and whether it adds a BOS) against
    the reference's: the report's ``tokenization`` entry, for every engine alike."""
    ref_ids = np.load(job["ref_ids"]).tolist()
    return {
        "engine_tokens": len(ids),
        "reference_tokens": len(ref_ids),
        "differ_share": token_mismatch_share(ref_ids, ids),
        "bos_agrees": bool(adds_bos) == bool(job.get("ref_adds_bos")),
    }


def quality(acc: Any, distribution: str) -> dict[str, Any]:
    """The report's ``quality`` entry from the scored positions: perplexity, and against the
    reference KLD and top-1 (exact from full distributions, approximate from top-k)."""
    ppl, err = acc.ppl()
    out: dict[str, Any] = {"ppl": ppl, "ppl_stderr": err}
    if acc.kld:
        k = acc.kld_stats()
        out.update(
            kld_mean=k["mean"],
            kld_p99=k["p99"],
            kld_max=k["max"],
            kld_method="exact" if distribution == "full" else "approx-top-k",
            top1_pct=100 * k["top1"],
            mean_abs_dp=k["mean_abs_dp"],
        )
    return out


def run(job: dict[str, Any], engine: Any = None) -> dict[str, Any]:
    """Carry out ``job``; ``engine`` (an Engine instance) replaces the one the job names — used
    in-process for a reference model that exists only in memory (engines.MemoryEngine)."""
    from quantkit.validate.engines import ENGINES, ModelEngine

    chunks = np.load(job["chunks"])
    first = int(job["first"])
    n_chunks, n_ctx = chunks.shape
    res: dict[str, Any] = {}
    cls = type(engine) if engine is not None else ENGINES[job["engine"]]
    assert issubclass(cls, ModelEngine), f"{cls.name} runs in its own worker script"
    if job["role"] == "artifact":
        audit = getattr(cls, "audit", None)  # the engine's own file audit (GGUF), when it has one
        if audit is not None:
            res["audit"] = audit(job["path"])
    eng = _load(job, cls, engine, n_ctx)
    res["engine"] = {
        "name": cls.name,
        "version": eng.version(),
        "distribution": cls.distribution,
        **eng.describe(),
    }
    res["load_seconds"] = eng.load_seconds
    try:
        if job["role"] == "artifact" and job.get("text"):
            own = eng.tokenize(read_text(job["text"]))
            if own is not None:
                res["tokenization"] = tokenization(job, *own)
        if job["role"] == "reference":
            acc, t_score = _score_reference(job, eng, chunks, first, res)
        else:
            acc, t_score = _score_artifact(job, eng, chunks, first)
        _progress(job, "score", n_chunks, n_chunks)
        res["quality"] = quality(acc, cls.distribution)
        res["score_seconds"] = t_score
        res["score_tps"] = n_chunks * n_ctx / t_score if t_score > 0 else None
        res["scored_tokens"] = n_chunks * (n_ctx - 1 - first)
        pp, tg = int(job.get("pp", 0)), int(job.get("tg", 0))
        if pp or tg:
            # the quality figures are kept if the speed run dies (validate/runner.py)
            res["peak_rss_bytes"] = _peak_rss()
            if not job.get("in_process"):
                write_json(Path(job["dir"]) / "scored.json", {"ok": True, **res})
            _progress(job, "speed", 0, 1)
            res["speed"] = {"pp": pp, "tg": tg, **_speed(eng, chunks, pp, tg)}
            _progress(job, "speed", 1, 1)
    finally:
        eng.unload()
    res["peak_rss_bytes"] = _peak_rss()
    return res


def _load(job: dict[str, Any], cls: Any, engine: Any, n_ctx: int) -> Any:
    """The job's engine, loaded with room for a chunk and the speed test's prompts."""
    if engine is None:
        n_load = max(n_ctx, int(job.get("pp", 0)), int(job.get("tg", 0)))
        engine = cls(
            job["path"], n_ctx=n_load, threads=int(job["threads"]), **job.get("options", {})
        )
    if not job.get("in_process"):
        print(f"[worker] loading {job['path']} in {cls.name}", file=sys.stderr, flush=True)
    _progress(job, "load", 0, 1)
    engine.load()
    _progress(job, "load", 1, 1)
    return engine


def _score_reference(
    job: dict[str, Any], eng: Any, chunks: np.ndarray, first: int, res: dict[str, Any]
) -> tuple[Any, float]:
    """Every chunk scored by the reference; the log-probs of its scored positions stored in the
    reference cache (float16 above REF_F32_LIMIT), its own NLL kept for its perplexity."""
    from quantkit.validate.metrics import Accumulator

    n_chunks = chunks.shape[0]
    acc, t_score = Accumulator(), 0.0
    store: np.ndarray | None = None
    for i in range(n_chunks):
        _progress(job, "score", i, n_chunks)
        c = chunks[i].tolist()
        t0 = time.perf_counter()
        sc = eng.score(c, first)
        t_score += time.perf_counter() - t0
        lp = sc.logprobs
        assert lp is not None, "the reference engine must return full distributions"
        if store is None:
            size = n_chunks * lp.shape[0] * lp.shape[1] * 4
            dtype = np.float32 if size <= REF_F32_LIMIT else np.float16
            store = np.lib.format.open_memmap(
                Path(job["ref_out"]) / "logprobs.npy",
                mode="w+",
                dtype=dtype,
                shape=(n_chunks, *lp.shape),
            )
        store[i] = lp
        targets = np.asarray(c[first + 1 :])
        acc.nll.extend((-lp[np.arange(len(targets)), targets].astype(np.float64)).tolist())
    assert store is not None
    store.flush()
    res["ref_dtype"] = str(store.dtype)
    res["vocab"] = int(store.shape[2])
    return acc, t_score


def _score_artifact(
    job: dict[str, Any], eng: Any, chunks: np.ndarray, first: int
) -> tuple[Any, float]:
    """Every chunk scored by the artifact's engine against the cached reference log-probs:
    exact per-position statistics from full distributions, approximate ones from top-k."""
    from quantkit.validate.metrics import (
        Accumulator,
        position_stats,
        position_stats_topk,
        renormalize,
    )

    n_chunks = chunks.shape[0]
    acc, t_score = Accumulator(), 0.0
    ref = np.load(job["ref_logprobs"], mmap_mode="r")
    for i in range(n_chunks):
        _progress(job, "score", i, n_chunks)
        c = chunks[i].tolist()
        t0 = time.perf_counter()
        sc = eng.score(c, first)
        # float32 was stored normalized; float16 rounding is undone by renormalizing
        lp_ref = renormalize(ref[i]) if ref.dtype == np.float16 else np.asarray(ref[i])
        targets = np.asarray(c[first + 1 :])
        if sc.logprobs is not None:
            if sc.logprobs.shape[1] != lp_ref.shape[1]:
                raise ValueError(
                    f"vocabulary of {sc.logprobs.shape[1]} tokens, the reference has "
                    f"{lp_ref.shape[1]}"
                )
            st = position_stats(sc.logprobs, targets, lp_ref)
        else:
            st = position_stats_topk(
                sc.topk_ids, sc.topk_logprobs, sc.target_logprobs, targets, lp_ref
            )
        t_score += time.perf_counter() - t0
        acc.extend(st)
    return acc, t_score


def _speed(eng: Any, chunks: np.ndarray, pp: int, tg: int) -> dict[str, Any]:
    try:
        return eng.speed(chunks.reshape(-1).tolist(), pp, tg)
    except Exception as e:  # the scores stand; the report says why pp/tg are missing
        traceback.print_exc()
        return {"pp_tps": None, "tg_tps": None, "error": f"{type(e).__name__}: {e}"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    job_file = Path(argv[0])
    job = json.loads(job_file.read_text())
    out = job_file.parent / "result.json"
    try:
        res = {"ok": True, **run(job)}
        code = 0
    except BaseException as e:  # noqa: B036 — the harness must get a result for any failure
        traceback.print_exc()
        res = {"ok": False, "error": f"{type(e).__name__}: {e}", "peak_rss_bytes": _peak_rss()}
        code = 1
    write_json(out, res)
    return code


if __name__ == "__main__":
    sys.exit(main())
