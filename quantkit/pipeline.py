"""``quantkit run RECIPE``: convert → imatrix → quantize → validate → report, with a cache.

Every step has a key: a sha256 over the content of its inputs (model files, calibration text,
settings, the key of the step it builds on). Shared intermediates (the F16 base GGUF, the
importance matrix) live in the cache under their key, so two targets never compute the same
thing twice. A target's artifact is reused when its manifest.json records the same key and the
file's sha256 still matches; its validation is reused when the report was made for that key.
Everything is written atomically (quantkit/atomic.py), so an interrupted run resumes where it
stopped. A fine-tune (``source.adapter``) adds one shared step, ``merge``: base + adapter merged by
PEFT into a cached HF copy for the steps that load the model in torch. Library code: no printing; ``log(message)`` is how progress is told.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_output
from quantkit.errors import InputError
from quantkit.hub import folder_name, hub_source
from quantkit.recipe import DEFAULT, GGUFTarget, Recipe, validated

KEY_VERSION = "1"  # bump when what a key covers changes
Log = Callable[[str], None]


def canonical_json(obj: Any) -> str:
    """Sorted keys, fixed indent, trailing newline: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def _key(*parts: Any) -> str:
    return hashlib.sha256(canonical_json([KEY_VERSION, *parts]).encode()).hexdigest()[:24]


def _sha256(path: Path) -> str:
    """A file's sha256, or for a checkpoint folder (vLLM targets) one over its files' names and
    contents (validate/harness.py model_hash)."""
    from quantkit.hashing import model_hash, sha256_file

    return model_hash(path) if path.is_dir() else sha256_file(path)


def _is_gguf(t: Any) -> bool:
    return isinstance(t, GGUFTarget)


def vllm_target(t: Any) -> Any:
    """The recipe's vLLM target as the plain option model of quantize/vllm_targets.py."""
    from quantkit.quantize import vllm_targets as vt

    base = next(c for c in type(t).__mro__[1:] if c in (vt.GPTQTarget, vt.AWQTarget, vt.FP8Target))
    return base(**t.model_dump(exclude={"name", "gates", "validate_"}))


@dataclass
class Step:
    kind: str  # base | imatrix | quantize | validate
    target: str | None  # the target it belongs to (None: shared)
    key: str
    path: str
    action: str = "build"  # build | reuse


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


class Context:
    """The recipe with its paths resolved and its content keys computed once."""

    def __init__(
        self,
        recipe: Recipe,
        recipe_path: Path,
        *,
        output: Path | None = None,
        model: Path | None = None,
    ) -> None:
        """``output`` / ``model`` override the recipe's (``quantkit demo MODEL -o OUT``)."""
        from quantkit.hashing import model_hash

        if output is not None or model is not None:
            recipe = recipe.model_copy(
                update={
                    "output": str(output) if output is not None else recipe.output,
                    "source": recipe.source.model_copy(
                        update={"model": str(model.absolute()) if model else recipe.source.model}
                    ),
                }
            )
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.base_dir = recipe_path.resolve().parent
        # outputs go where the user runs quantkit (like -o); inputs are found next to the recipe
        self.out = Path(recipe.output).expanduser().absolute()
        self.cache = (
            Path(recipe.cache).expanduser().absolute() if recipe.cache else self.out / ".cache"
        )
        self.model = self._model(recipe.source.model)
        self.model_key = model_hash(self.model)
        # a fine-tune: the base plus a PEFT LoRA adapter, merged into every target
        self.adapter = self._adapter(recipe.source.adapter)
        self.adapter_key = model_hash(self.adapter) if self.adapter else None
        # what the targets are made from: the base's files, plus the adapter's when there is one
        # (without one the keys are the base's alone, so recipes without an adapter keep their cache)
        self.source_key = (
            _key("lora", self.model_key, self.adapter_key) if self.adapter else self.model_key
        )
        self.calib = self._text(recipe.calibration.data) if recipe.calibration else None
        self.vdata = self._text(recipe.validation.data) if recipe.validation else None
        # artifacts are named like `quantkit convert` names them: after the adapter for a fine-tune
        self.stem = self.adapter.resolve().name if self.adapter else folder_name(self.model)

    def _path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def _model(self, m: str) -> Path:
        if m == DEFAULT:
            from quantkit.demo import demo_model

            return demo_model()
        p = self._path(m)
        if not p.exists():
            from quantkit.hub import is_hub_id, resolve_model

            if is_hub_id(m):  # a local folder of that spelling would have won
                p = resolve_model(m)
        if not (p / "config.json").is_file():
            raise InputError(f"source.model: {p} is not a Hugging Face model folder")
        return p

    def _adapter(self, a: str | None) -> Path | None:
        if a is None:
            return None
        from quantkit.convert.lora import LoraAdapter

        p = self._path(a)
        if not p.is_dir():
            raise InputError(f"source.adapter: {p} is not a PEFT adapter folder")
        LoraAdapter.open(p).close()  # refuses a bad adapter (DoRA, missing files...) up front
        return p

    def hf_model(self) -> Path:
        """The HF checkpoint that torch-side steps load (imatrix, llm-compressor): the model
        itself, or for a fine-tune the merged copy in the cache."""
        return self.merged_path() if self.adapter else self.model

    def _text(self, d: str) -> Path:
        if d == DEFAULT:
            from quantkit.demo_run import DEMO_TEXT

            p = self.cache / "texts" / "demo.txt"
            if not p.is_file():
                p.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(p, force=True) as tmp:
                    tmp.write_text(DEMO_TEXT, encoding="utf-8")
            return p
        p = self._path(d)
        if not p.is_file():
            raise InputError(f"{p}: text not found")
        return p

    # --- keys and paths of every step -------------------------------------------------------
    def base_key(self) -> str:
        return _key("base-F16", self.source_key)

    def merged_key(self) -> str:
        return _key("merged", self.source_key)

    def merged_path(self) -> Path:
        return self.cache / f"merged-{self.merged_key()}" / self.stem

    def base_path(self) -> Path:
        return self.cache / f"base-{self.base_key()}" / f"{self.stem}-F16.gguf"

    def imatrix_key(self) -> str:
        c = self.recipe.calibration
        assert c is not None and self.calib is not None
        return _key("imatrix", self.source_key, _sha256(self.calib), c.ctx, c.chunks)

    def imatrix_path(self) -> Path:
        return self.cache / f"imatrix-{self.imatrix_key()}.gguf"

    def target_key(self, t: Any) -> str:
        if not _is_gguf(t):
            v = vllm_target(t)
            c = self.recipe.calibration
            calib = None
            if v.needs_calibration:
                if c is None or self.calib is None:
                    raise InputError(f"targets: {t.name}: needs a calibration section")
                calib = [_sha256(self.calib), c.samples, c.ctx]
            return _key("vllm", self.source_key, v.model_dump(), calib)
        opts = t.model_dump(include={"type", "overrides", "output_type", "embedding_type"})
        if t.type == "AUTO":  # the budget, and the probe text the per-kind gains are measured on
            opts.update(t.model_dump(include={"size", "bpw", "types"}))
            opts["probe"] = _sha256(self.calib) if self.calib else None
        return _key("gguf", self.base_key(), opts, self.imatrix_key() if t.imatrix else None)

    def target_dir(self, t: Any) -> Path:
        return self.out / t.name

    def artifact_path(self, t: Any) -> Path:
        if not _is_gguf(t):
            return self.target_dir(t) / f"{self.stem}-{vllm_target(t).label()}"
        return self.target_dir(t) / f"{self.stem}-{t.type}.gguf"

    def validation_key(self, t: GGUFTarget) -> str:
        v = self.recipe.validation
        assert v is not None and self.vdata is not None
        gates = self.recipe.gates.merged(t.gates)
        return _key(
            "validate", self.target_key(t), self.source_key, _sha256(self.vdata),
            v.model_dump(), gates.model_dump(),
        )  # fmt: skip


def _manifest(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def _artifact_ok(ctx: Context, t: GGUFTarget) -> bool:
    """Trusted only when the manifest says so for this key and the bytes still hash the same."""
    m = _manifest(ctx.target_dir(t))
    p = ctx.artifact_path(t)
    return bool(
        m and m.get("key") == ctx.target_key(t) and p.exists() and m.get("sha256") == _sha256(p)
    )


def host_tag() -> str:
    """What decides whether an engine can run a format here, and how fast (CPU features, a GPU):
    an "unsupported" or "too-slow" verdict is reused only on a host with the same tag."""
    import platform

    from quantkit.host import has_cuda, kernel_flags

    return _key("host", platform.machine(), kernel_flags(), has_cuda())


def _validation_ok(ctx: Context, t: GGUFTarget) -> bool:
    m = _manifest(ctx.target_dir(t))
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
    need_base = any(_is_gguf(t) and t.type not in ("F32", "BF16") for t in todo)
    need_imatrix = any(getattr(t, "imatrix", False) for t in todo)
    ip = ctx.imatrix_path() if need_imatrix else None
    # a fine-tune's torch-side steps (imatrix, llm-compressor) load a merged HF copy
    if ctx.adapter and (any(not _is_gguf(t) for t in todo) or (ip and not ip.is_file())):
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


def run(
    ctx: Context,
    only: list[str] | None = None,
    log: Log | None = None,
    progress: Any = None,
) -> RunResult:
    say = log or (lambda _m: None)
    steps = plan(ctx, only)
    targets = {t.name: t for t in selected(ctx.recipe, only)}
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
            _build_merged(ctx)
        elif s.kind == "base":
            _build_base(ctx, progress)
        elif s.kind == "imatrix":
            _build_imatrix(ctx, progress)
        elif s.kind == "quantize" and not _is_gguf(t):
            _build_vllm(ctx, t, progress)
        elif s.kind == "quantize":
            _build_target(ctx, t, progress)
        elif s.kind == "validate":
            _validate_target(ctx, t, progress)
    for t in targets.values():
        m = _manifest(ctx.target_dir(t)) or {}
        res.manifests.append(m)
        _write_card(ctx, t, m)
        v = m.get("validation", {})
        res.failed_gates += [{"target": t.name, **g} for g in v.get("failed_gates", [])]
        if v.get("failed_artifacts"):
            res.failed_artifacts.append(t.name)
        if v.get("unsupported_artifacts"):
            res.unsupported.append({"target": t.name, "error": v.get("error") or ""})
        if v.get("too_slow_artifacts"):
            res.too_slow.append({"target": t.name, "error": v.get("error") or ""})
    res.report = _combined_report(ctx, list(targets.values()))
    _write(ctx.out / "run.json", canonical_json({"recipe": ctx.recipe.name, **res.to_json()}))
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
    merged = _merge_reports(reports)
    _write_report(ctx.out, merged)
    plot(merged, ctx.out / "report.png")
    return merged


def _merge_reports(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """One report from several (each scored against the same reference and text), in the
    order given; each artifact keeps its own gates."""
    names = list(reports)
    merged = dict(reports[names[0]])
    merged["artifacts"] = [a for n in names for a in reports[n]["artifacts"]]
    for k in ("failed_gates", "failed_artifacts", "unsupported_artifacts", "too_slow_artifacts"):
        merged[k] = [x for n in names for x in reports[n].get(k, [])]
    merged["passed"] = all(reports[n]["passed"] for n in names)
    return merged


def _write_report(out: Path, report: dict[str, Any]) -> None:
    from quantkit.validate.report import markdown

    _write(out / "report.json", canonical_json(report))
    _write(out / "report.md", markdown(report))


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _build_base(ctx: Context, progress: Any) -> None:
    from quantkit.convert import convert

    p = ctx.base_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    convert(ctx.model, ["F16"], p, force=True, progress=progress, adapter=ctx.adapter)


MERGED_MARK = "quantkit-merged.json"  # written last: a merged folder without it is incomplete


def _build_merged(ctx: Context) -> None:
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


def _build_imatrix(ctx: Context, progress: Any) -> None:
    from quantkit.quantize.imatrix import collect_imatrix, save_imatrix
    from quantkit.text import read_text

    c = ctx.recipe.calibration
    assert c is not None and ctx.calib is not None
    im = collect_imatrix(
        ctx.hf_model(), read_text(ctx.calib), ctx=c.ctx, chunks=c.chunks, progress=progress
    )
    save_imatrix(im, ctx.imatrix_path())


def _build_target(ctx: Context, t: GGUFTarget, progress: Any) -> None:
    from quantkit.convert import QuantSettings, convert
    from quantkit.convert.hf_to_gguf import requantize
    from quantkit.quantize.gguf import QuantizeOptions, parse_overrides
    from quantkit.quantize.gguf_types import gguf_type

    d = ctx.target_dir(t)
    d.mkdir(parents=True, exist_ok=True)
    final = ctx.artifact_path(t)
    (d / "manifest.json").unlink(missing_ok=True)  # the old one no longer describes the file
    if t.type == "AUTO":
        c = ctx.recipe.calibration
        qs = QuantSettings(
            imatrix_file=ctx.imatrix_path(),
            calib=ctx.calib,  # only the probe text here: the matrix is the recipe's
            calib_ctx=c.ctx if c else 512,
        )
        requantize(
            ctx.base_path(), [], final, force=True, progress=progress, quant=qs, dry_run=False,
            autos=[t.auto_spec()],
        )  # fmt: skip
    elif t.type == "F16":  # the base itself: copied, not converted again
        with atomic_output(final, force=True) as tmp:
            shutil.copyfile(ctx.base_path(), tmp)
    elif gguf_type(t.type).base:
        convert(ctx.model, [t.type], final, force=True, progress=progress, adapter=ctx.adapter)
    else:
        qs = QuantSettings(
            options=QuantizeOptions(
                output_type=t.output_type,
                embedding_type=t.embedding_type,
                overrides=parse_overrides(t.overrides),
            ),
            imatrix_file=ctx.imatrix_path() if t.imatrix else None,
        )
        requantize(
            ctx.base_path(), [gguf_type(t.type)], final,
            force=True, progress=progress, quant=qs, dry_run=False,
        )  # fmt: skip
    c = ctx.recipe.calibration
    _write_manifest(
        ctx,
        t,
        final,
        "gguf",
        t.type,
        t.model_dump(
            include={
                "type",
                "overrides",
                "output_type",
                "embedding_type",
                "imatrix",
                "size",
                "bpw",
                "types",
            },
            exclude_none=True,
        ),  # fmt: skip
        c.model_dump() if t.imatrix and c else None,
    )


def _build_vllm(ctx: Context, t: Any, progress: Any) -> None:
    """AWQ/GPTQ/FP8 through llm-compressor in its own environment (quantize/vllm.py)."""
    from quantkit.quantize.vllm import VllmSettings, export_vllm

    v = vllm_target(t)
    c = ctx.recipe.calibration
    d = ctx.target_dir(t)
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").unlink(missing_ok=True)
    final = ctx.artifact_path(t)
    s = VllmSettings(calib=ctx.calib if v.needs_calibration else None)
    if c is not None and v.needs_calibration:
        s.samples, s.seq_len = c.samples, c.ctx
    export_vllm(ctx.hf_model(), [v], final, s, force=True, progress=progress)
    calib = c.model_dump() if c is not None and v.needs_calibration else None
    _write_manifest(ctx, t, final, "vllm", v.label(), v.model_dump(), calib)


def _hub(model: Path) -> dict[str, str] | None:
    src = hub_source(model)
    return {"id": src[0], "commit": src[1]} if src else None


def _write_manifest(
    ctx: Context, t: Any, final: Path, fmt: str, type_: str, options: dict, calib: dict | None
) -> None:
    from quantkit import __version__

    size = (
        sum(p.stat().st_size for p in final.rglob("*") if p.is_file())
        if final.is_dir()
        else (final.stat().st_size)
    )
    manifest = {
        "target": t.name,
        "artifact": final.name,
        "format": fmt,
        "type": type_,
        "size": size,
        "sha256": _sha256(final),
        "key": ctx.target_key(t),
        "provenance": {
            "recipe": ctx.recipe.name,
            "recipe_sha256": _sha256(ctx.recipe_path),
            "source": ctx.recipe.source.model,
            "source_sha256": ctx.model_key,
            # a Hub id as source: the repository and the snapshot's commit it resolved to
            "source_hub": _hub(ctx.model),
            # the fine-tune's PEFT adapter (path as in the recipe, sha256 over its files)
            "adapter": ctx.recipe.source.adapter,
            "adapter_sha256": ctx.adapter_key,
            "options": options,
            "calibration_sha256": _sha256(ctx.calib) if calib and ctx.calib else None,
            "calibration": calib,
            "tools": _versions(__version__),
        },
    }
    _write(ctx.target_dir(t) / "manifest.json", canonical_json(manifest))


def _versions(qk: str) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"quantkit": qk}
    for pkg in ("llama-cpp-python", "gguf", "transformers", "torch"):  # this venv's engines
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _validate_target(ctx: Context, t: Any, progress: Any) -> None:
    from quantkit.validate.harness import Gates, Settings, validate
    from quantkit.validate.report import markdown, plot

    v = ctx.recipe.validation
    assert v is not None and ctx.vdata is not None
    g = ctx.recipe.gates.merged(t.gates)
    s = Settings(
        ctx=v.ctx, chunks=v.chunks, threads=v.threads, pp=v.pp, tg=v.tg, timeout=v.timeout,
        kv_f32=v.kv_f32, vllm_eager=v.vllm_eager, adapter=ctx.adapter, max_minutes=v.max_minutes,
        gates=Gates(g.max_kld, g.max_ppl_increase_pct, g.min_top1_pct, g.per_type_defaults),
    )  # fmt: skip
    report = validate([ctx.artifact_path(t)], ctx.model, ctx.vdata, s, progress=progress)
    d = ctx.target_dir(t)
    _write(d / "report.json", canonical_json(report))
    _write(d / "report.md", markdown(report))
    plot(report, d / "report.png")
    art = report["artifacts"][0] if report["artifacts"] else {}
    m = _manifest(d) or {}
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
    _write(d / "manifest.json", canonical_json(m))


def _fmt(x: Any, spec: str = ".4g") -> str:
    return "—" if x is None else format(x, spec)


# The measured values a model card shows: (label, key in the report's artifact entry, format).
# Each row names its report.json key, so a reader (and tests/test_run_checks.py) can find it.
CARD_METRICS: tuple[tuple[str, str, str], ...] = (
    ("perplexity", "quality.ppl", ".4g"),
    ("perplexity increase over the reference, %", "quality.ppl_increase_pct", ".3g"),
    ("mean KL divergence from the reference", "quality.kld_mean", ".4g"),
    ("99th-percentile KL divergence", "quality.kld_p99", ".4g"),
    ("top-1 token agreement with the reference, %", "quality.top1_pct", ".3g"),
    ("bits per weight", "size.bits_per_weight", ".4g"),
    ("prompt processing, tokens/s", "speed.pp_tps", ".1f"),
    ("generation, tokens/s", "speed.tg_tps", ".1f"),
)
PROMPT = "Once upon a time"
RUN_CTX = 2048  # the context the cards' commands ask for, at most the model's own


def _run_ctx(ctx: Context) -> int:
    """RUN_CTX, or less for a model trained on a shorter context (vLLM refuses a max_model_len
    above config.json's max_position_embeddings)."""
    try:
        cfg = json.loads((ctx.model / "config.json").read_text())
    except (OSError, ValueError):
        return RUN_CTX
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return min(RUN_CTX, int(n)) if isinstance(n, int) and n > 0 else RUN_CTX


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _validate_command(ctx: Context, t: Any, name: str) -> str:
    """The `quantkit validate` line that repeats this target's measurement (same reference,
    text, settings and gates; paths as on the machine that ran the recipe)."""
    import shlex

    v = ctx.recipe.validation
    assert v is not None and ctx.vdata is not None
    g = ctx.recipe.gates.merged(t.gates)
    args = ["quantkit", "validate", name, "--reference", str(ctx.model), "--data", str(ctx.vdata),
            "--ctx", str(v.ctx), "--pp", str(v.pp), "--tg", str(v.tg)]  # fmt: skip
    opts = (
        ("--chunks", v.chunks), ("--threads", v.threads), ("--adapter", ctx.adapter),
        ("--max-minutes", v.max_minutes),
        ("--max-kld", g.max_kld), ("--max-ppl-increase", g.max_ppl_increase_pct),
        ("--min-top1", g.min_top1_pct),
    )  # fmt: skip
    args += [x for k, val in opts if val is not None for x in (k, str(val))]
    args += [
        f for f, on in (("--kv-f32", v.kv_f32), ("--default-gates", g.per_type_defaults)) if on
    ]
    return shlex.join([*args, "--json", "validate-check.json"])


def _run_section(ctx: Context, t: Any, name: str, gguf: bool) -> list[str]:
    """How to run the artifact: a Python snippet for the engine quantkit installs (llama-cpp-python
    in its venv, vLLM in its engine env), then the engines' own command lines."""
    import re

    n_ctx = _run_ctx(ctx)
    if gguf:
        ollama = re.sub(r"[^a-z0-9._-]+", "-", ctx.stem.lower()).strip("-.") or "model"
        lines = [
            "Python, with llama-cpp-python (installed with quantkit):",
            "",
            "```python",
            "from llama_cpp import Llama",
            "",
            f'llm = Llama(model_path="{name}", n_ctx={n_ctx}, verbose=False)',
            f'print(llm("{PROMPT}", max_tokens=32)["choices"][0]["text"])',
            "```",
            "",
            "llama.cpp's own tools and Ollama (installed separately):",
            "",
            "```sh",
            f"llama-cli -m {name} -p '{PROMPT}' -n 32",
            f"llama-server -m {name} --port 8080",
            f"printf 'FROM ./{name}\\n' > Modelfile",
            f"ollama create {ollama} -f Modelfile",
            f"ollama run {ollama} '{PROMPT}'",
            "```",
            "",
            "vLLM loads GGUF files experimentally (llama-family models; the tokenizer from the "
            "source model); for vLLM prefer this recipe's AWQ/GPTQ/FP8 targets:",
            "",
            "```sh",
            f"vllm serve ./{name} --tokenizer {ctx.model}",
            "```",
        ]
    else:
        lines = [
            "Python, with vLLM (quantkit's copy is the `vllm` environment that "
            "`quantkit engines status` lists; run this with its python):",
            "",
            "```python",
            "from vllm import LLM, SamplingParams",
            "",
            'if __name__ == "__main__":  # vLLM starts its engine in a spawned child process',
            "    # a fixed KV cache: by default vLLM reserves ~90% of the memory (of the RAM on CPU)",
            f'    llm = LLM(model="./{name}", max_model_len={n_ctx}, kv_cache_memory_bytes=1 << 30)',
            f'    out = llm.generate(["{PROMPT}"], SamplingParams(max_tokens=32))',
            "    print(out[0].outputs[0].text)",
            "```",
            "",
            "An OpenAI-compatible server (the quantization is read from config.json):",
            "",
            "```sh",
            f"vllm serve ./{name} --max-model-len {n_ctx} --kv-cache-memory-bytes 1G",
            "```",
        ]
    if validated(ctx.recipe, t):
        lines += [
            "",
            "Repeat the measurement (quantkit; paths as on the machine that ran the recipe):",
            "",
            "```sh",
            _validate_command(ctx, t, name),
            "```",
        ]
    return lines


def _write_card(ctx: Context, t: Any, m: dict[str, Any]) -> None:
    """The model card: what the file is, how it was made, what it measured, how to run it."""
    if not m:
        return
    p = m["provenance"]
    gguf = m["format"] == "gguf"
    v = m.get("validation") or {}
    tools = ", ".join(f"{k} {val}" for k, val in sorted(p["tools"].items()))
    source = f"`{p['source']}`"
    if p.get("adapter"):
        source = f"the fine-tune `{p['adapter']}` (PEFT LoRA adapter on `{p['source']}`)"
    lines = [
        f"# {ctx.stem} — {m['type']} {'GGUF' if gguf else 'checkpoint for vLLM'}",
        "",
        f"`{m['artifact']}`: {m['type']} quantization of {source} for "
        f"{'llama.cpp' if gguf else 'vLLM'}, made by",
        f"quantkit from recipe `{p['recipe']}` (target `{t.name}`).",
        "",
        "## How it was made",
        "",
        f"- base model: `{p['source']}` (files sha256 `{p['source_sha256']}`)",
    ]
    if p.get("source_hub"):
        lines.append(
            f"- from the Hugging Face Hub: `{p['source_hub']['id']}` at commit "
            f"`{p['source_hub']['commit']}`"
        )
    if p.get("adapter"):
        lines.append(
            f"- adapter: `{p['adapter']}` (PEFT LoRA, merged; files sha256 `{p['adapter_sha256']}`)"
        )
    lines += [
        f"- recipe sha256: `{p['recipe_sha256']}`",
        f"- options: `{json.dumps(p['options'], sort_keys=True)}`",
        "- calibration: "
        + (f"sha256 `{p['calibration_sha256']}`" if p["calibration_sha256"] else "none"),
        f"- tools: {tools}",
        f"- size: {m['size']} bytes, sha256 `{m['sha256']}`",
        "",
        "## Measured",
        "",
    ]
    rp = ctx.target_dir(t) / "report.json"
    report = json.loads(rp.read_text()) if v and rp.is_file() else None
    entry = report["artifacts"][0] if report and report.get("artifacts") else None
    if v.get("unsupported_artifacts"):
        lines.append(f"Built, but not scorable on the host that ran the recipe: {v.get('error')}")
    elif v.get("too_slow_artifacts"):
        lines.append(f"Built, but not scored within the recipe's time budget: {v.get('error')}")
    elif entry is not None and report is not None:
        ref = report.get("reference", {})
        data = report.get("data", {})
        against = f"`{ref.get('model')}`" + (" + the adapter" if p.get("adapter") else "")
        lines += [
            f"In {entry.get('engine', {}).get('version', '?')}, against {against} in "
            f"{ref.get('engine', {}).get('version', 'transformers')}, on "
            f"{data.get('scored_tokens')} tokens of `{Path(data.get('path', '?')).name}` "
            f"(ctx {data.get('ctx')}, {data.get('chunks')} chunk(s)). Every value is in "
            "report.json under `artifacts[0]` at the key shown.",
            "",
            "| metric | report.json key | value |",
            "|---|---|---|",
        ]
        for label, key, spec in CARD_METRICS:
            val = _dig(entry, key)
            if isinstance(val, (int, float)):
                lines.append(f"| {label} | `{key}` | {format(val, spec)} |")
        gates = "; ".join(
            f"{g['gate']} {g['threshold']:g} ({'passed' if g['passed'] else 'FAILED'})"
            for g in entry.get("gates") or []
        )
        lines += [
            "",
            f"Gates: {gates or 'none set'}; overall {'passed' if v.get('passed') else 'FAILED'}.",
            "",
            "Full report: report.md / report.json / report.png (docs/report-schema.md).",
        ]
    elif v:
        lines.append("Could not be scored: see report.md.")
    else:
        lines.append("Not validated by this recipe.")
    lines += ["", "## How to run", "", *_run_section(ctx, t, m["artifact"], gguf), ""]
    _write(ctx.target_dir(t) / "README.md", "\n".join(lines))


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
    _write(out / "manifest.json", canonical_json(merged_manifest))
    if reports:
        merged = _merge_reports({n: reports[n] for n in sorted(reports)})
        _write_report(out, merged)
        return merged
    return merged_manifest
