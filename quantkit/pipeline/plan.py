"""What a run will do: every step, each marked build or reuse (nothing is written)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from quantkit.errors import InputError
from quantkit.hashing import content_sha256
from quantkit.pipeline.context import (
    MERGED_MARK,
    Context,
    content_key,
    read_manifest,
)
from quantkit.recipe import Recipe, RecipeTarget, validated


@dataclass
class Step:
    kind: str  # base | imatrix | quantize | validate
    target: str | None  # the target it belongs to (None: shared)
    key: str
    path: str
    action: str = "build"  # build | reuse


def _artifact_ok(ctx: Context, t: RecipeTarget) -> bool:
    """Trusted only when the manifest says so for this key and the bytes still hash the same."""
    m = read_manifest(ctx.target_dir(t))
    p = ctx.artifact_path(t)
    return bool(
        m
        and m.get("key") == ctx.target_key(t)
        and p.exists()
        and m.get("sha256") == content_sha256(p)
    )


def host_tag() -> str:
    """What decides whether an engine can run a format here, and how fast (CPU features, a GPU):
    an "unsupported" or "too-slow" verdict is reused only on a host with the same tag."""
    import platform

    from quantkit.host import has_cuda, kernel_flags

    return content_key("host", platform.machine(), kernel_flags(), has_cuda())


def _validation_ok(ctx: Context, t: RecipeTarget) -> bool:
    m = read_manifest(ctx.target_dir(t))
    v = (m or {}).get("validation", {})
    return bool(
        m
        and v.get("key") == ctx.validation_key(t)
        and (
            not (v.get("unsupported_artifacts") or v.get("too_slow_artifacts"))
            or v.get("host") == host_tag()
        )
        and (ctx.target_dir(t) / "report.json").is_file()
    )


def selected(recipe: Recipe, only: list[str] | None) -> list[Any]:
    if not only:
        return list(recipe.targets)
    names = [t.name for t in recipe.targets]
    bad = [o for o in only if o not in names]
    if bad:
        raise InputError(
            f"--only {', '.join(bad)}: no such target", f"the recipe has {', '.join(names)}"
        )
    return [t for t in recipe.targets if t.name in only]


def plan(ctx: Context, only: list[str] | None = None) -> list[Step]:
    """Every step the run will take, each marked build or reuse (nothing is written)."""
    targets = selected(ctx.recipe, only)
    steps: list[Step] = []
    todo = [t for t in targets if not _artifact_ok(ctx, t)]
    need_base = any(ctx.uses_base(t.target) for t in todo)
    need_imatrix = any(getattr(t.target, "imatrix", False) for t in todo)
    ip = ctx.imatrix_path() if need_imatrix else None
    # a fine-tune's torch-side steps (imatrix, llm-compressor) load a merged HF copy
    torch_side = any(t.target.family == "vllm" for t in todo)
    if ctx.adapter and (torch_side or (ip and not ip.is_file())):
        mp = ctx.merged_path()
        done = (mp / MERGED_MARK).is_file()
        steps.append(Step("merge", None, ctx.merged_key(), str(mp), _act(done)))
    if need_base:
        bp = ctx.base_path()
        steps.append(Step("base", None, ctx.base_key(), str(bp), _act(bp.is_file())))
    if ip is not None:
        steps.append(Step("imatrix", None, ctx.imatrix_key(), str(ip), _act(ip.is_file())))
    for t in targets:
        ok = t not in todo
        steps.append(
            Step("quantize", t.name, ctx.target_key(t), str(ctx.artifact_path(t)), _act(ok))
        )
        if validated(ctx.recipe, t):
            vok = ok and _validation_ok(ctx, t)
            rp = ctx.target_dir(t) / "report.json"
            steps.append(Step("validate", t.name, ctx.validation_key(t), str(rp), _act(vok)))
    return steps


def _act(reuse: bool) -> str:
    return "reuse" if reuse else "build"
