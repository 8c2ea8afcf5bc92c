"""HF checkpoint → vLLM checkpoint (GPTQ, AWQ, FP8) through llm-compressor.

Flow: preflight everything that can fail cheaply, without loading weights (output path,
checkpoint, target options, every targeted Linear's input width against the group size, the
architecture against llm-compressor's AWQ mappings, calibration text long enough, memory);
then one llm-compressor ``oneshot`` in the llmcompressor environment (quantize/vllm/llmc_worker.py,
run by path: quantkit is not installed there) writes a compressed-tensors checkpoint into a
temporary folder; quantkit completes it (tokenizer files, generation config, chat template),
repacks it into the legacy gptq/awq layouts when asked (quantize/vllm/legacy.py), and renames each
output into place only when complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.atomic import atomic_output_dir, check_writable_dir, output_dirs
from quantkit.checkpoint import SIDE_FILES, TOKENIZER_DIRS, Checkpoint
from quantkit.errors import EngineError, InputError
from quantkit.hashing import tree_size
from quantkit.progress import Progress
from quantkit.quantize.vllm.auto.spec import VllmAutoSpec
from quantkit.quantize.vllm.calibration import calibration_ids
from quantkit.quantize.vllm.checks import Plan, preflight, target_ignore
from quantkit.quantize.vllm.settings import VllmSettings
from quantkit.quantize.vllm.targets import (
    MOE_EXPERTS_IGNORE,
    VllmTarget,
)
from quantkit.worker_jobs import JOB_FILE, read_result, run_job

if TYPE_CHECKING:
    import numpy as np

    from quantkit.pipeline.build import Output

WORKER = Path(__file__).with_name("llmc_worker.py")


@dataclass
class VllmArtifact:
    path: Path
    type: str  # e.g. "gptq-w4g64" or "gptq-w4g64 (legacy gptq)"
    layout: str
    quant_method: str
    size: int
    seconds: float
    quantized_layers: int
    ignored_layers: list[str] = field(default_factory=list)
    auto: dict[str, Any] | None = None  # gptq:auto: the plan and the bits written

    def to_json(self) -> dict[str, Any]:
        return {
            **({"auto": self.auto} if self.auto is not None else {}),
            "path": str(self.path),
            "type": self.type,
            "layout": self.layout,
            "quant_method": self.quant_method,
            "size": self.size,
            "seconds": round(self.seconds, 3),
            "quantized_layers": self.quantized_layers,
            "ignored_layers": self.ignored_layers,
        }


@dataclass
class VllmResult:
    artifacts: list[VllmArtifact]
    plan: Plan
    timings: dict[str, float]
    worker: dict[str, Any]
    notes: list[str] = field(default_factory=list)  # the CLI prints them on stderr


# -- running the worker --------------------------------------------------------------------------


def llmc_python() -> Path:
    from quantkit import envs

    return envs.python("llmcompressor")


def run_worker(
    job: dict[str, Any], work: Path, python: Path, timeout: float, progress: Progress | None
) -> dict[str, Any]:
    """Run llmc_worker.py for ``job``; its output goes to work/worker.log (to stderr with
    QUANTKIT_DEBUG=1). Returns the worker's result or raises a one-line EngineError."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("PYTHONPATH", None)  # nothing of quantkit's venv may leak into the other env
    fin = run_job(
        # -I: isolated (no script folder on sys.path: its neighbours, targets.py, export.py,
        # settings.py …, must not shadow packages llm-compressor imports; no PYTHON* variables,
        # no user site);
        # -u: unbuffered
        [str(python), "-I", "-u", str(WORKER), str(work / JOB_FILE)],
        job,
        work,
        timeout=timeout,
        env=env,
        progress=progress,
        heartbeat=False,
        log_to_terminal=os.environ.get("QUANTKIT_DEBUG") == "1",
    )
    if fin.timed_out:
        raise EngineError(f"llm-compressor did not finish in {timeout:g} s", "lower --samples")
    res = read_result(work)
    if res is None or not res.get("ok"):
        why = res["error"] if res else f"the llm-compressor process died (exit code {fin.rc})"
        raise EngineError(
            f"llm-compressor failed: {why}",
            "rerun with QUANTKIT_DEBUG=1 to see llm-compressor's own output",
        )
    return res


# -- export --------------------------------------------------------------------------------------


# vLLM asks whether a fused-MoE layer is ignored by ``<layer>.experts.0.<ckpt projection>``
# (compressed_tensors_moe.py get_moe_method), with its model's checkpoint projection names —
# w1/w2/w3 for Mixtral (models/mixtral.py) — while llm-compressor's ignore list holds the
# linearized names (…experts.0.gate_proj). A regex over any expert projection lets vLLM see
# float experts whichever names it uses.
VLLM_EXPERTS_IGNORE = "re:.*\\.experts\\.\\d+\\..*"


def complete_checkpoint(src_model: Path, out: Path, experts_in_float: bool = False) -> None:
    """Copy the side files the save did not write and check the quantization config; when the
    experts were left in float, say so in a form vLLM matches (VLLM_EXPERTS_IGNORE)."""
    for name in SIDE_FILES:
        if (src_model / name).is_file() and not (out / name).exists():
            shutil.copy2(src_model / name, out / name)
    for name in TOKENIZER_DIRS:
        if (src_model / name).is_dir() and not (out / name).exists():
            shutil.copytree(src_model / name, out / name)
    cfg = json.loads((out / "config.json").read_text())
    q = cfg.get("quantization_config") or {}
    if q.get("quant_method") != "compressed-tensors":
        raise EngineError(
            f"llm-compressor wrote no compressed-tensors quantization_config in {out}/config.json"
        )
    if experts_in_float and VLLM_EXPERTS_IGNORE not in (q.get("ignore") or []):
        q["ignore"] = [*(q.get("ignore") or []), VLLM_EXPERTS_IGNORE]
        (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def export_vllm(
    model: str | os.PathLike[str],
    targets: Sequence[str | VllmTarget],
    out: str | os.PathLike[str] | None = None,
    settings: VllmSettings | None = None,
    *,
    force: bool = False,
    progress: Progress | None = None,
    python: Path | None = None,
    name: str | None = None,
) -> VllmResult:
    """Quantize a local HF checkpoint for vLLM, one llm-compressor run for every target.

    ``out``: the checkpoint folder itself for one target in one layout, else the folder holding
    ``STEM-LABEL`` folders, placed by quantkit/pipeline/build.py ``place`` as every entry point
    places them; ``name``: that STEM (default: the model's name)."""
    from quantkit.pipeline.build import Source, place
    from quantkit.targets import parse_targets

    s = settings or VllmSettings()
    ts = parse_targets(targets)
    stem = Source(model, name=name).stem()
    outputs = place(ts, Path(out) if out is not None else None, stem, layouts=s.layouts)
    return export_placed(model, outputs, s, force=force, progress=progress, python=python)


def export_placed(
    model: str | os.PathLike[str],
    outputs: Sequence[Output],
    settings: VllmSettings,
    *,
    force: bool = False,
    progress: Progress | None = None,
    python: Path | None = None,
) -> VllmResult:
    """``export_vllm`` of outputs already placed (quantkit/pipeline/build.py ``Output``: target,
    path, layout); the artifacts come back in the outputs' order."""
    s = dataclasses.replace(settings, layouts=tuple(dict.fromkeys(x.layout for x in outputs)))
    model_dir = Path(model)
    asked = list(dict.fromkeys(x.target for x in outputs))
    if any(t.family != "vllm" for t in asked):
        raise InputError(
            "export_vllm() makes gptq, awq, fp8, int8, nvfp4 and mxfp4 checkpoints",
            "see quantkit.export",
        )
    parsed, auto_notes = _planned(model_dir, asked, s, progress)
    # each output's folder, by the target written (gptq:auto: its plan) and layout
    of = {id(a): p for a, p in zip(asked, parsed, strict=True)}
    paths: dict[int, dict[str, Path]] = {}
    for x in outputs:
        paths.setdefault(id(of[id(x.target)]), {})[x.layout] = x.path
    # legacy first: it reads the compressed-tensors output, which then moves into place
    s.layouts = tuple(sorted(s.layouts, key=lambda lay: lay != "legacy"))
    t_start = time.perf_counter()
    job = _preflight(model_dir, parsed, auto_notes, paths, s, force=force, python=python)
    timings = {"preflight": time.perf_counter() - t_start}
    artifacts, worker_res = _run(job, s, timings, force=force, progress=progress)
    made = {a.path: a for a in artifacts}
    timings["total"] = time.perf_counter() - t_start
    return VllmResult([made[x.path] for x in outputs], job.plans[id(job.parsed[0])], timings,
                      worker_res, job.notes)  # fmt: skip


def _planned(
    model_dir: Path, targets: list[Any], s: VllmSettings, progress: Progress | None
) -> tuple[list[Any], list[str]]:
    """The vLLM targets, each gptq:auto planned into the target it writes (same order), and
    the planning's notes."""
    if any(isinstance(t, VllmAutoSpec) for t in targets):  # gptq:auto: plan it now
        from quantkit.quantize.vllm.auto.plan import resolve

        return resolve(model_dir, targets, s, progress)
    return targets, []


@dataclass
class _Job:
    """An export that passed its preflight: each target with its settings, plan and outputs."""

    model_dir: Path
    parsed: list[Any]  # VllmTargets (gptq:auto already planned)
    layouts: tuple[str, ...]  # legacy first
    per_target: dict[int, VllmSettings]  # by id() of the target: its own ignore list
    plans: dict[int, Plan]
    paths: dict[int, dict[str, Path]]  # by id() of the target, then by layout
    ids: np.ndarray | None  # the calibration token ids, when a target calibrates
    python: Path  # the llmcompressor environment's interpreter
    notes: list[str]

    @property
    def all_paths(self) -> list[Path]:
        return [p for t in self.parsed for p in self.paths[id(t)].values()]


def _preflight(
    model_dir: Path,
    parsed: list[Any],
    notes: list[str],
    paths: dict[int, dict[str, Path]],
    s: VllmSettings,
    *,
    force: bool,
    python: Path | None,
) -> _Job:
    """All targets, before any model load."""
    for t in parsed:
        for p in paths[id(t)].values():
            check_writable_dir(p, force=force)
    if any(t.needs_calibration for t in parsed) and s.calib is None:
        which = ", ".join(t.label() for t in parsed if t.needs_calibration)
        raise InputError(
            f"{which} need calibration text (gptq, awq, int8, fp8:static and nvfp4 calibrate)",
            "pass --calib FILE (plain text; e.g. a few hundred KB of text like the model's use)",
        )
    py = python
    env_error: EngineError | None = None
    if py is None:
        try:
            py = llmc_python()
        except EngineError as e:  # bad input is reported first; then the missing env
            env_error = e
    with Checkpoint.open(model_dir) as ck:
        config = ck.config
    per_target, tnotes = _per_target(parsed, s, config)
    plans = {id(t): preflight(model_dir, t, per_target[id(t)], py) for t in parsed}
    for t in parsed:
        pl = plans[id(t)]
        if pl.offload_cpu_bytes is not None and pl.memory_available is not None:
            gib = 2**30
            tnotes.append(
                f"{t.label()}: the model in memory needs about {pl.memory_estimate / gib:.1f} GiB "
                f"and {pl.memory_available / gib:.1f} GiB is available, so llm-compressor keeps "
                f"{pl.offload_cpu_bytes / gib:.1f} GiB of weights in memory and the rest on disk, "
                f"one decoder layer at a time in memory (about "
                f"{(pl.memory_offloaded or 0) / gib:.1f} GiB)"
            )
    if env_error is not None or py is None:
        raise env_error or EngineError("no llmcompressor environment")
    ids = None
    if s.calib is not None and any(t.needs_calibration for t in parsed):
        ids = calibration_ids(model_dir, s.calib, s.samples, s.seq_len)
    labels = [t.label() for t in parsed]
    if len(set(labels)) != len(labels):
        raise InputError("the same vLLM target was given twice", "give each --to once")
    return _Job(model_dir, parsed, tuple(s.layouts), per_target, plans, paths, ids, py,
                [*notes, *tnotes])  # fmt: skip


def _per_target(
    parsed: list[Any], s: VllmSettings, config: dict[str, Any]
) -> tuple[dict[int, VllmSettings], list[str]]:
    """Each target's settings (its own ignore list) and the notes that explain the additions."""
    notes: list[str] = []
    per_target: dict[int, VllmSettings] = {}
    for t in parsed:
        ign, tnotes = target_ignore(t, s.ignore, config)
        ign = (*ign, *getattr(t, "float_layers", ()))  # gptq:auto's groups left in float
        per_target[id(t)] = dataclasses.replace(s, ignore=ign)
        notes += tnotes
    return per_target, notes


def _run(
    job: _Job, s: VllmSettings, timings: dict[str, float], *, force: bool, progress: Progress | None
) -> tuple[list[VllmArtifact], dict[str, Any]]:
    """One worker process for every target (one start of torch + llm-compressor), then each
    output placed. The work folder sits beside the outputs so that moving a result into place
    is a rename."""
    artifacts: list[VllmArtifact] = []
    all_paths = job.all_paths
    with (
        output_dirs(all_paths),
        tempfile.TemporaryDirectory(prefix=".quantkit-llmc-", dir=all_paths[0].parent) as ws,
    ):
        work = Path(ws)
        worker_job = _worker_job(job, s, work)
        t0 = time.perf_counter()
        worker_res = run_worker(worker_job, work, job.python, s.timeout, progress)
        timings["llm-compressor"] = time.perf_counter() - t0
        for t in job.parsed:
            placed = _place_target(job, t, work, worker_res, force=force)
            job.notes += _auto_bits(t, placed)
            artifacts += placed
    return artifacts, worker_res


def _worker_job(job: _Job, s: VllmSettings, work: Path) -> dict[str, Any]:
    """llmc_worker.py's job: one export per target, each into its own folder under ``work``
    (the calibration ids saved there beside them)."""
    if job.ids is not None:
        import numpy as np

        np.save(work / "calib.npy", job.ids)
    exports = [
        {
            "label": t.label(),
            "output": str(work / t.label()),
            "recipe": t.to_recipe(),
            "ignore": list(job.per_target[id(t)].ignore),
            **(
                {
                    "offload_cpu_bytes": job.plans[id(t)].offload_cpu_bytes,
                    "offload_dir": str(work / f"offload-{t.label()}"),
                }
                if job.plans[id(t)].offload_cpu_bytes is not None
                else {}
            ),
            **(
                {"calib_ids": str(work / "calib.npy")}
                if t.needs_calibration and job.ids is not None
                else {}
            ),
        }
        for t in job.parsed
    ]
    return {
        "model": str(job.model_dir.resolve()),
        "seq_len": s.seq_len,
        "threads": s.threads,
        "exports": exports,
    }


def _place_target(
    job: _Job, t: Any, work: Path, worker_res: dict[str, Any], *, force: bool
) -> list[VllmArtifact]:
    """``t``'s compressed-tensors output completed, then written in each layout."""
    plan, tp, ct_dir = job.plans[id(t)], job.paths[id(t)], work / t.label()
    plan.calib_tokens = int(job.ids.size) if (job.ids is not None and t.needs_calibration) else 0
    complete_checkpoint(job.model_dir, ct_dir, MOE_EXPERTS_IGNORE in job.per_target[id(t)].ignore)
    wt = (worker_res.get("timings") or {}).get(t.label(), {})
    quant_seconds = float(sum(wt.values()))
    artifacts = []
    for lay in job.layouts:
        final = tp[lay]
        t1 = time.perf_counter()
        with atomic_output_dir(final, force=force) as tmp:
            method = _place(ct_dir, tmp, lay, t.method, last=lay == job.layouts[-1])
        artifacts.append(
            VllmArtifact(
                path=final,
                type=t.label(),
                layout=lay,
                quant_method=method,
                size=tree_size(final),
                seconds=quant_seconds + time.perf_counter() - t1,
                quantized_layers=len(plan.quantized),
                ignored_layers=plan.ignored,
            )
        )
    return artifacts


def _place(ct_dir: Path, tmp: Path, layout: str, method: str, *, last: bool) -> str:
    """``ct_dir`` written at ``tmp`` in ``layout``; returns the quant_method written."""
    if layout == "legacy":
        from quantkit.quantize.vllm.legacy import repack

        repack(ct_dir, tmp, method)
        return method
    if last:  # last use: a rename, no copy
        os.replace(ct_dir, tmp)
    else:
        shutil.copytree(ct_dir, tmp)
    return "compressed-tensors"


def _auto_bits(t: Any, artifacts: list[VllmArtifact]) -> list[str]:
    """gptq:auto: the bits the written checkpoint holds, recorded in its artifact and said."""
    notes = []
    for a in artifacts:
        if (plan := getattr(t, "plan_json", None)) and a.layout == "compressed-tensors":
            from quantkit.quantize.vllm.auto.plan import actual_bits

            a.auto = {**plan, "actual_bits": round(actual_bits(a.path, plan), 4)}
            notes.append(
                f"{a.type}: {a.auto['actual_bits']:.3f} bits per weight written "
                f"({plan['predicted_bits']:.3f} predicted, {plan['bits_asked']:g} asked)"
            )
    return notes
