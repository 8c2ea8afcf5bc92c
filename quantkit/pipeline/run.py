"""``quantkit run RECIPE``: convert → imatrix → quantize → validate → report, with a cache.

Every step has a key: a sha256 over the content of its inputs (model files, calibration text,
settings, the key of the step it builds on). Shared intermediates (the float base GGUF, the
importance matrix) live in the cache under their key, so two targets never compute the same
thing twice. A target's artifact is reused when its manifest.json records the same key and the
file's sha256 still matches; its validation is reused when the report was made for that key.
Everything is written atomically (quantkit/atomic.py), so an interrupted run resumes where it
stopped. A fine-tune (``source.adapter``) adds one shared step, ``merge``: base + adapter merged by
PEFT into a cached HF copy for the steps that load the model in torch. Library code: no printing; ``log(message)`` is how progress is told.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.pipeline.cards import write_card
from quantkit.pipeline.context import Context, canonical_json, read_manifest, write_atomic
from quantkit.pipeline.merge import merge_reports, write_report
from quantkit.pipeline.plan import Step, plan, selected
from quantkit.pipeline.steps import (
    build_base,
    build_imatrix,
    build_merged,
    build_target,
    validate_target,
)
from quantkit.recipe import validated

Log = Callable[[str], None]  # how progress is told: library code does not print


@dataclass
class RunResult:
    steps: list[Step]
    manifests: list[dict[str, Any]] = field(default_factory=list)
    failed_gates: list[dict[str, Any]] = field(default_factory=list)
    failed_artifacts: list[str] = field(default_factory=list)  # could not be scored
    # built, but the engine cannot run the format on this host ({"target", "error"}): not a
    # failure, the run still passes (docs/report-schema.md "unsupported")
    unsupported: list[dict[str, str]] = field(default_factory=list)
    # scored at a rate that did not fit validation.max_minutes ({"target", "error"}): the run fails
    too_slow: list[dict[str, str]] = field(default_factory=list)
    report: dict[str, Any] | None = None  # every validated target in one report (OUT/report.*)

    def to_json(self) -> dict[str, Any]:
        return {
            "steps": [asdict(s) for s in self.steps],
            "manifests": self.manifests,
            "failed_gates": self.failed_gates,
            "failed_artifacts": self.failed_artifacts,
            "unsupported": self.unsupported,
            "too_slow": self.too_slow,
        }


def run(
    ctx: Context,
    only: list[str] | None = None,
    log: Log | None = None,
    progress: Any = None,
) -> RunResult:
    say = log or (lambda _m: None)
    steps = plan(ctx, only)
    targets = {t.name: t for t in selected(ctx.recipe, only)}
    v = ctx.recipe.validation
    if v is not None and any(s.kind == "validate" and s.action == "build" for s in steps):
        # a vLLM layout the host cannot hold is refused before anything is built
        from quantkit.validate.engines import VllmEngine

        VllmEngine.check_parallel(v.vllm.tensor_parallel_size, v.vllm.pipeline_parallel_size)
    res = RunResult(steps)
    n = len(steps)
    for i, s in enumerate(steps, 1):
        what = f"[{i}/{n}] {s.kind}{' ' + s.target if s.target else ''}"
        if s.action == "reuse":
            say(f"{what}: reused ({Path(s.path).name})")
            continue
        say(f"{what}: building {Path(s.path).name}")
        t = targets.get(s.target or "")
        if s.kind == "merge":
            build_merged(ctx)
        elif s.kind == "base":
            build_base(ctx, progress)
        elif s.kind == "imatrix":
            build_imatrix(ctx, progress)
        elif s.kind == "quantize":
            build_target(ctx, t, progress)
        elif s.kind == "validate":
            validate_target(ctx, t, progress)
    for t in targets.values():
        m = read_manifest(ctx.target_dir(t)) or {}
        res.manifests.append(m)
        write_card(ctx, t, m)
        v = m.get("validation", {})
        res.failed_gates += [{"target": t.name, **g} for g in v.get("failed_gates", [])]
        if v.get("failed_artifacts"):
            res.failed_artifacts.append(t.name)
        if v.get("unsupported_artifacts"):
            res.unsupported.append({"target": t.name, "error": v.get("error") or ""})
        if v.get("too_slow_artifacts"):
            res.too_slow.append({"target": t.name, "error": v.get("error") or ""})
    res.report = _combined_report(ctx, list(targets.values()))
    write_atomic(ctx.out / "run.json", canonical_json({"recipe": ctx.recipe.name, **res.to_json()}))
    return res


def _combined_report(ctx: Context, targets: list[Any]) -> dict[str, Any] | None:
    """The validated targets' reports as one: OUT/report.json, .md and .png (the chart)."""
    from quantkit.validate.report import plot

    reports = {}
    for t in targets:
        p = ctx.target_dir(t) / "report.json"
        if validated(ctx.recipe, t) and p.is_file():
            reports[t.name] = json.loads(p.read_text())
    if not reports:
        return None
    merged = merge_reports(reports)
    write_report(ctx.out, merged)
    plot(merged, ctx.out / "report.png")
    return merged
