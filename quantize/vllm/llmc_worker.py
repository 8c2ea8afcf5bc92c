"""Run one llm-compressor ``oneshot`` export; executed by path in the llmcompressor environment.

Self-contained on purpose (stdlib, numpy and that environment's packages; no ``import quantkit``):
quantkit is not installed there (quantkit/envs.py). quantkit writes ``job.json`` into a work
folder and runs ``python llmc_worker.py WORK/job.json``; this script

  - appends ``STAGE DONE TOTAL`` lines to ``WORK/progress`` (quantkit draws the bars),
  - for every entry of ``job["exports"]``, loads the model, runs ``oneshot`` and saves the
    compressed-tensors checkpoint into its ``output`` (a temporary folder that quantkit
    completes and renames),
  - writes ``WORK/result.json``: {"ok": true, ...} or {"ok": false, "error": one line, "type"}.

llm-compressor's own logging goes to the worker's stdout/stderr, which quantkit sends to a log
file unless QUANTKIT_DEBUG=1. ``bench/vllm_export.py`` imports ``build_recipe``/``load_calibration``
from here so its direct llm-compressor baseline makes exactly the same call.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any


class Progress:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(f"{stage} {done} {total}\n")


def cpu_quirks() -> list[str]:
    """Work around llm-compressor issues on CPU-only torch; returns what was patched.

    llmcompressor 0.14.0.1: AWQ caches calibration intermediates with
    ``IntermediatesCache.pin_memory``, which calls ``Tensor.pin_memory()`` and fails on CPU-only
    torch ("Cannot access accelerator device when none is available"). Pinned memory only
    speeds up host→GPU copies, so with no accelerator the call becomes a no-op (docs/decisions.md,
    measured 2026-11-24)."""
    import torch

    patched = []
    if torch.cuda.is_available() or getattr(torch, "xpu", None) and torch.xpu.is_available():
        return patched
    try:
        from llmcompressor.pipelines.cache import IntermediatesCache
    except ImportError:
        return patched
    if hasattr(IntermediatesCache, "pin_memory"):

        def _no_pin(self, *args, **kwargs):
            return self

        IntermediatesCache.pin_memory = _no_pin
        patched.append("IntermediatesCache.pin_memory")
    return patched


def build_recipe(export: dict[str, Any]) -> Any:
    """The llm-compressor modifier(s) for ``export["recipe"]`` (made by quantkit's target
    models) and ``export["ignore"]``."""
    r = export["recipe"]
    ignore = list(export["ignore"])
    kind = r["modifier"]
    if kind == "QuantizationModifier":
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(targets=["Linear"], scheme=r["preset"], ignore=ignore)
    # gptq:auto gives its own config groups (one per scheme, targets by module name)
    group = {"targets": ["Linear"], "weights": r.get("weights")}
    if r.get("activations"):  # W8A8: activations quantized too
        group["input_activations"] = r["activations"]
    groups = r.get("config_groups") or {"group_0": group}
    if kind == "GPTQModifier":
        from llmcompressor.modifiers.quantization import GPTQModifier

        gptq = GPTQModifier(config_groups=groups, ignore=ignore, **r.get("kwargs", {}))
        if not r.get("smoothing"):
            return gptq
        # SmoothQuant first (its default mappings: q/k/v from input_layernorm, gate/up from
        # post_attention_layernorm, as llm-compressor 0.14 infers them per architecture)
        from llmcompressor.modifiers.transform.smoothquant import SmoothQuantModifier

        return [SmoothQuantModifier(smoothing_strength=float(r["smoothing"])), gptq]
    if kind == "AWQModifier":
        # llmcompressor 0.14: AWQ is a transform (smoothing scales) followed by a separate
        # QuantizationModifier; the old single AWQModifier is a deprecated shim for this pair.
        from llmcompressor.modifiers.quantization import QuantizationModifier
        from llmcompressor.modifiers.transform.awq import AWQModifier

        return [
            AWQModifier(**r.get("kwargs", {})),
            QuantizationModifier(config_groups=groups, ignore=ignore),
        ]
    raise ValueError(f"unknown modifier {kind!r}")


def load_calibration(export: dict[str, Any]) -> Any:
    """Calibration samples (token ids made by quantkit, [samples, seq_len]) as a Dataset."""
    if not export.get("calib_ids"):
        return None
    import numpy as np
    from datasets import Dataset

    ids = np.load(export["calib_ids"])
    return Dataset.from_dict(
        {"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist()}
    )


def load_model(job: dict[str, Any], export: dict[str, Any] | None = None) -> tuple[Any, Any]:
    """The model in its own dtype. With ``export["offload_cpu_bytes"]`` (quantkit's preflight:
    the whole model does not fit in memory) only that many bytes of weights stay in memory and
    the rest go to ``offload_dir`` on disk: accelerate's device map, turned into
    compressed-tensors' offloading by ``load_offloaded_model`` (llm-compressor 0.14's way to
    calibrate a model larger than memory), so the sequential pipeline brings one decoder layer
    at a time into memory and GPTQ/AWQ write each quantized layer back to disk."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cpu = (export or {}).get("offload_cpu_bytes")
    if cpu is None:
        model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
    else:
        from compressed_tensors.offload import load_offloaded_model

        folder = Path(export["offload_dir"])  # type: ignore[index]
        folder.mkdir(parents=True, exist_ok=True)
        with load_offloaded_model():
            model = AutoModelForCausalLM.from_pretrained(
                job["model"],
                dtype="auto",
                device_map="auto_offload",
                max_memory={"cpu": int(cpu)},
                offload_folder=str(folder),
            )
    tok = AutoTokenizer.from_pretrained(job["model"])
    return model, tok


def _report_layers(progress: Progress) -> None:
    """Turn the sequential pipeline's per-subgraph tqdm bars into progress lines."""
    try:
        import llmcompressor.pipelines.sequential.pipeline as seq
    except ImportError:
        return
    orig = getattr(seq, "tqdm", None)
    if orig is None:
        return

    def tqdm(iterable=None, *args, desc: str = "", **kwargs):
        # desc looks like "(3/30): Calibrating"; report the subgraph as done once calibrated
        try:
            head = desc.split(")")[0].lstrip("(")
            i, n = (int(x) for x in head.split("/"))
        except ValueError:
            return orig(iterable, *args, desc=desc, **kwargs)

        def gen():
            yield from orig(iterable, *args, desc=desc, **kwargs)
            if "Calibrating" in desc:
                progress("calibrate layers", i, n)  # a subgraph: one decoder layer (or the tail)

        return gen()

    seq.tqdm = tqdm


def pick_threads(asked: int | None) -> int:
    """torch intra-op threads: what was asked, else 1 on a CPU-only host (torch's default on CUDA).

    Not the load-dependent "idle cores" count: the thread count changes the bytes of a GPTQ
    export (torch 2.13's CPU Cholesky of a 576×576 Hessian differs by ~1e-5 between 1 and 2
    threads, enough to move a rounding boundary), and a recipe trusts an artifact by its sha256.
    And 1 is not slower where it matters here: GPTQ quantizes one weight column at a time
    (llmcompressor 0.14 ``gptq_block_update``: thousands of tiny ops per layer, each a parallel
    region waiting for every thread); SmolLM2-135M, one layer, 4×128 tokens, 2 busy cores:
    96.9 s wall / 30.4 s CPU with 2 threads, 11.7 s / 3.9 s with 1. ``--threads N`` for more."""
    if asked:
        return int(asked)
    import torch

    return torch.get_num_threads() if torch.cuda.is_available() else 1


def run(job: dict[str, Any], progress: Progress) -> dict[str, Any]:
    """Every export of ``job["exports"]`` in turn, each from a freshly loaded model (one
    process start for all targets of a ``quantkit convert``)."""
    import torch

    threads = pick_threads(job.get("threads"))
    torch.set_num_threads(threads)
    quirks = cpu_quirks()
    current = {"label": ""}
    _report_layers(lambda stage, done, total: progress(f"{current['label']}:{stage}", done, total))
    timings: dict[str, dict[str, float]] = {}
    for export in job["exports"]:
        current["label"] = export["label"]
        timings[export["label"]] = export_one(job, export, progress)
    return {"timings": timings, "quirks": quirks, "versions": _versions(), "threads": threads}


def export_one(job: dict[str, Any], export: dict[str, Any], progress: Progress) -> dict[str, float]:
    """One export: the model loaded afresh, quantized by llm-compressor's ``oneshot`` on the
    calibration samples (none for FP8 dynamic/block), saved compressed with its tokenizer;
    the seconds of each step."""
    from llmcompressor import oneshot

    label = export["label"]
    t: dict[str, float] = {}
    t0 = time.perf_counter()
    progress(f"{label}:load", 0, 1)
    model, tok = load_model(job, export)
    progress(f"{label}:load", 1, 1)
    t["load"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    ds = load_calibration(export)
    kwargs: dict[str, Any] = {}
    if ds is not None:
        kwargs.update(
            dataset=ds,
            max_seq_length=int(job["seq_len"]),
            num_calibration_samples=len(ds),
            shuffle_calibration_samples=False,
        )
    oneshot(model=model, recipe=build_recipe(export), **kwargs)
    t["quantize"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress(f"{label}:save", 0, 1)
    model.save_pretrained(Path(export["output"]), save_compressed=True)
    tok.save_pretrained(Path(export["output"]))
    progress(f"{label}:save", 1, 1)
    t["save"] = time.perf_counter() - t0
    del model
    if export.get("offload_dir"):
        import shutil

        shutil.rmtree(export["offload_dir"], ignore_errors=True)
    return t


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {}
    for d in ("llmcompressor", "compressed-tensors", "transformers", "torch"):
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            pass
    return out


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def one_line(e: BaseException) -> str:
    errors = getattr(e, "errors", None)  # pydantic: "1 validation error for X" says little
    if callable(errors):
        try:
            first = errors()[0]
            loc = ".".join(str(p) for p in first.get("loc", ()))
            return f"{type(e).__name__}: {loc}: {first.get('msg', '')}".strip()
        except Exception:  # noqa: BLE001 - fall back to the message
            pass
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


def main(argv: list[str]) -> int:
    job_file = Path(argv[1])
    job = json.loads(job_file.read_text())
    work = job_file.parent
    progress = Progress(work / "progress")
    try:
        res = run(job, progress)
        res.update(ok=True, peak_rss=_peak_rss())
        code = 0
    except BaseException as e:  # noqa: BLE001 - reported to quantkit as one line
        traceback.print_exc()
        res = {"ok": False, "error": one_line(e), "type": type(e).__name__}
        code = 1
    (work / "result.json.tmp").write_text(json.dumps(res))
    os.replace(work / "result.json.tmp", work / "result.json")
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv))
