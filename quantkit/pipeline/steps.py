"""The steps of a run: merge (a fine-tune), base, imatrix, quantize (through the export
dispatch, quantkit/pipeline/build.py) and validate; each writes its outputs and manifest."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_output
from quantkit.hashing import content_sha256
from quantkit.hub import hub_source
from quantkit.pipeline.context import (
    MERGED_MARK,
    Context,
    canonical_json,
    read_manifest,
    write_atomic,
)
from quantkit.pipeline.plan import host_tag
from quantkit.recipe import RecipeTarget
from quantkit.targets import GGUFTarget


def build_base(ctx: Context, progress: Any) -> None:
    from quantkit.convert import convert

    p = ctx.base_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    convert(ctx.model, [ctx.base_type], p, force=True, progress=progress, adapter=ctx.adapter)


def build_merged(ctx: Context) -> None:
    """base + adapter merged by PEFT (merge_and_unload) and saved as an HF checkpoint, for the
    steps that load a model in torch. The GGUF base does not use it: convert merges while
    streaming, in float32 (convert/lora.py)."""
    from quantkit.atomic import atomic_dir
    from quantkit.convert.lora import save_merged

    final = ctx.merged_path()
    with atomic_dir(final) as tmp:
        save_merged(ctx.model, ctx.adapter, tmp)
        (tmp / MERGED_MARK).write_text(
            canonical_json({"base_sha256": ctx.model_key, "adapter_sha256": ctx.adapter_key})
        )


def build_imatrix(ctx: Context, progress: Any) -> None:
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.text import read_text

    c = ctx.recipe.calibration
    assert c is not None and ctx.calib is not None
    im = collect_imatrix(
        ctx.hf_model(), read_text(ctx.calib), ctx=c.ctx, chunks=c.chunks, progress=progress
    )
    save_imatrix(im, ctx.imatrix_path())


def build_target(ctx: Context, t: RecipeTarget, progress: Any) -> None:
    """One target through the export dispatch (quantkit/pipeline/build.py), from the step it
    builds on: quantized GGUF types from the cached float base and importance matrix, vLLM
    checkpoints from the model (a fine-tune: its cached merged copy), float GGUF and hf
    targets from the model and adapter themselves."""
    from quantkit.pipeline.build import Artifact, ExportOptions, Source, build

    tg = t.target
    d = ctx.target_dir(t)
    d.mkdir(parents=True, exist_ok=True)
    final = ctx.artifact_path(t)
    (d / "manifest.json").unlink(missing_ok=True)  # the old one no longer describes the file
    c = ctx.recipe.calibration
    o = ExportOptions(force=True, progress=progress, name=ctx.stem)
    calib = None
    if isinstance(tg, GGUFTarget) and tg.type == ctx.base_type:  # the base: copied, not made again
        with atomic_output(final, force=True) as tmp:
            shutil.copyfile(ctx.base_path(), tmp)
        art = Artifact(final, "gguf", tg.label(), final.stat().st_size, content_sha256(final), 0.0)
        _write_manifest(ctx, t, art, "gguf", tg.label(), _options(tg), None)
        return
    if ctx.uses_base(tg):  # a quantized type or gguf:auto
        src = Source(ctx.base_path())
        o.name = None  # a GGUF input keeps its own name
        o.imatrix = ctx.imatrix_path() if tg.imatrix else None
        if tg.is_auto:  # only the probe text here: the matrix is the recipe's
            o.calib, o.calib_ctx = ctx.calib, c.ctx if c else o.calib_ctx
        calib = c.model_dump() if tg.imatrix and c else None
    elif tg.family == "vllm":
        src = Source(ctx.hf_model(), name=ctx.stem)
        if tg.needs_calibration and c is not None:
            o.calib, o.samples, o.seq_len = ctx.calib, c.samples, c.ctx
            calib = c.model_dump()
    else:
        src = Source(ctx.model, ctx.adapter, name=ctx.stem)
    with src:
        res = build(src, [tg], final, o)
    art = res.artifacts[0]
    _write_manifest(ctx, t, art, art.format, art.label, _options(tg), calib)


def _options(tg: Any) -> dict[str, Any]:
    return tg.model_dump(exclude_none=True, exclude_defaults=False)


def _hub(model: Path) -> dict[str, str] | None:
    src = hub_source(model)
    return {"id": src[0], "commit": src[1]} if src else None


def _write_manifest(
    ctx: Context, t: Any, art: Any, fmt: str, type_: str, options: dict, calib: dict | None
) -> None:
    """``art``: the artifact record (path, size, sha256) the builder returned."""
    from quantkit import __version__

    final, size = art.path, art.size
    manifest = {
        "target": t.name,
        "artifact": final.name,
        "format": fmt,
        "type": type_,
        "size": size,
        "sha256": art.sha256,
        "key": ctx.target_key(t),
        "provenance": {
            "recipe": ctx.recipe.name,
            "recipe_sha256": content_sha256(ctx.recipe_path),
            "source": ctx.recipe.source.model,
            "source_sha256": ctx.model_key,
            # a Hub id as source: the repository and the snapshot's commit it resolved to
            "source_hub": _hub(ctx.model),
            # the fine-tune's PEFT adapter (path as in the recipe, sha256 over its files)
            "adapter": ctx.recipe.source.adapter,
            "adapter_sha256": ctx.adapter_key,
            "options": options,
            "calibration_sha256": ctx.calib_sha if calib else None,
            "calibration": calib,
            "tools": _versions(__version__),
        },
    }
    write_atomic(ctx.target_dir(t) / "manifest.json", canonical_json(manifest))


def _versions(qk: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"quantkit": qk}
    for pkg in ("llama-cpp-python", "gguf", "transformers", "torch"):  # this venv's engines
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def validate_target(ctx: Context, t: Any, progress: Any) -> None:
    from quantkit.validate.harness import Gates, Settings, validate
    from quantkit.validate.report import markdown, plot

    v = ctx.recipe.validation
    assert v is not None and ctx.vdata is not None
    g = ctx.recipe.gates.merged(t.gates)
    s = Settings(
        ctx=v.ctx, chunks=v.chunks, threads=v.threads, pp=v.pp, tg=v.tg, timeout=v.timeout,
        kv_f32=v.kv_f32, vllm_eager=v.vllm_eager, adapter=ctx.adapter, max_minutes=v.max_minutes,
        tensor_parallel_size=v.vllm.tensor_parallel_size,
        pipeline_parallel_size=v.vllm.pipeline_parallel_size,
        gates=Gates(g.max_kld, g.max_ppl_increase_pct, g.min_top1_pct, g.per_type_defaults),
    )  # fmt: skip
    report = validate([ctx.artifact_path(t)], ctx.model, ctx.vdata, s, progress=progress)
    d = ctx.target_dir(t)
    write_atomic(d / "report.json", canonical_json(report))
    write_atomic(d / "report.md", markdown(report))
    plot(report, d / "report.png")
    art = report["artifacts"][0] if report["artifacts"] else {}
    m = read_manifest(d) or {}
    m["validation"] = {
        # an artifact that could not be scored (crash, timeout) is tried again by the next run;
        # one its engine cannot run on this host is not, on this host (host_tag)
        "key": None if report["failed_artifacts"] else ctx.validation_key(t),
        "passed": report["passed"],
        "quality": art.get("quality"),
        "speed": art.get("speed"),
        "gates": art.get("gates", []),
        "failed_gates": report["failed_gates"],
        "failed_artifacts": report["failed_artifacts"],
        "unsupported_artifacts": report.get("unsupported_artifacts", []),
        "too_slow_artifacts": report.get("too_slow_artifacts", []),
        "error": art.get("error"),
        "host": host_tag(),
    }
    write_atomic(d / "manifest.json", canonical_json(m))
