"""Reports and manifests of several runs (or targets) as one: ``quantkit report merge``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.errors import InputError
from quantkit.pipeline.context import canonical_json, write_atomic


def merge_reports(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report from several (each scored against the same reference and text), in the
    order given; each artifact keeps its own gates."""
    names = list(reports)
    merged = dict(reports[names[0]])
    merged["artifacts"] = [a for n in names for a in reports[n]["artifacts"]]
    for k in ("failed_gates", "failed_artifacts", "unsupported_artifacts", "too_slow_artifacts"):
        merged[k] = [x for n in names for x in reports[n].get(k, [])]
    merged["passed"] = all(reports[n]["passed"] for n in names)
    return merged


def write_report(out: Path, report: dict[str, Any]) -> None:
    from quantkit.validate.report import markdown

    write_atomic(out / "report.json", canonical_json(report))
    write_atomic(out / "report.md", markdown(report))


# --- report merge ---------------------------------------------------------------------------


def _job_targets(src: Path) -> list[Path]:
    """Target folders of a job output (OUT/NAME/manifest.json) or a merged folder's own."""
    if (src / "manifest.json").is_file() and not (src / "run.json").is_file():
        return [src]
    return sorted(p.parent for p in src.glob("*/manifest.json"))


def merge(sources: list[Path], out: Path) -> dict[str, Any]:
    """Combine the manifests and reports of several jobs (``run --only``) into OUT.

    Canonical JSON with everything sorted by target name: the same inputs in any order give
    byte-identical files. A target present in two jobs must be the same artifact.
    """
    manifests: dict[str, dict[str, Any]] = {}
    reports: dict[str, dict[str, Any]] = {}
    for src in sources:
        if not src.is_dir():
            raise InputError(f"{src}: not a run output folder")
        dirs = _job_targets(src)
        if not dirs:
            raise InputError(f"{src}: no target manifests found", "give `quantkit run` outputs")
        for d in dirs:
            m = json.loads((d / "manifest.json").read_text())
            name = m["target"]
            if name in manifests and manifests[name]["sha256"] != m["sha256"]:
                raise InputError(f"target {name}: different artifacts in two jobs")
            manifests[name] = m
            if (d / "report.json").is_file():
                reports[name] = json.loads((d / "report.json").read_text())
    names = sorted(manifests)
    merged_manifest = {"artifacts": [manifests[n] for n in names]}
    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "manifest.json", canonical_json(merged_manifest))
    if reports:
        merged = merge_reports({n: reports[n] for n in sorted(reports)})
        write_report(out, merged)
        return merged
    return merged_manifest
