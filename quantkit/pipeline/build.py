"""Export dispatch: every target kind to its builder, through one table.

``build(source, targets, out, options)`` groups the parsed targets (quantkit/targets.py) by the
builder that makes them — the GGUF converter (one read of the checkpoint for every GGUF file and
adapter), llm-compressor (one worker process for every vLLM checkpoint) or the HF checkpoint
writer — and returns one artifact record per file or folder written, in the order asked. The CLI
(``quantkit convert``), ``quantkit.export`` and recipe steps all call it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantkit.errors import InputError
from quantkit.hashing import content_sha256
from quantkit.progress import Progress
from quantkit.targets import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    FAMILY,
    IMATRIX_CTX,
    GGUFTarget,
    updated,
)


@dataclass
class ExportOptions:
    """How every target is made; one set of defaults for the CLI, the API and recipes."""

    force: bool = False
    threads: int | None = None
    name: str | None = None  # the output stem (and GGUF general.name)
    dry_run: bool = False
    allow_pickle: bool = False
    clamp_f16: bool = False
    converter: str = "auto"  # native | upstream | auto (GGUF)
    no_fallback: bool = False  # GGUF: a tensor that cannot get its type is an error
    calib: Path | None = None  # calibration text (importance matrix; GPTQ/AWQ samples)
    imatrix: Path | None = None  # a saved llama.cpp importance matrix
    calib_ctx: int = IMATRIX_CTX
    calib_chunks: int | None = None
    # vLLM only; None: not given (a given one with no vLLM target is refused, even at the default)
    samples: int | None = None  # calibration samples (default DEFAULT_SAMPLES)
    seq_len: int | None = None  # tokens per calibration sample (default DEFAULT_SEQ_LEN)
    ignore: tuple[str, ...] = ()  # vLLM: Linear layers left in float (default: lm_head)
    layouts: tuple[str, ...] = ()  # vLLM: compressed-tensors and/or legacy
    progress: Progress | None = None


@dataclass
class Artifact:
    """One file or folder written (or planned, in a dry run)."""

    path: Path
    format: str  # gguf | gguf-lora | vllm-lora | vllm | hf
    label: str  # Q8_0, AUTO-100000000B, gptq-w4g64, fp8-dynamic, hf-bf16, gguf-lora, ...
    size: int  # bytes; a folder: of all its files; a dry run: predicted
    sha256: str  # a file's; a folder's: one hash over its files' names and bytes; dry run: ""
    seconds: float
    target: Any = None  # the Target it was made for
    audit: dict[str, Any] | None = None  # GGUF: types, bits per weight, fallbacks
    metrics: dict[str, Any] | None = None  # its validation report entry, when asked
    details: dict[str, Any] = field(default_factory=dict)  # what only this format has

    def to_json(self) -> dict[str, Any]:
        skip = ("target", "details")
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}
        out["path"] = str(self.path)
        out["seconds"] = round(self.seconds, 3)
        return {**out, **self.details}


@dataclass
class BuildResult:
    artifacts: list[Artifact]
    architecture: str
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    gguf: Any = None  # the converter's ConvertResult (imatrix, clamped tensors, converter used)
    vllm: Any = None  # llm-compressor's VllmResult (plan, worker record)

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "artifacts": [a.to_json() for a in self.artifacts],
            "warnings": self.warnings,
            "notes": self.notes,
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
        }


class Source:
    """What the targets are made from: a checkpoint folder (or a float GGUF, or an open
    ``Checkpoint`` over a model in memory) and an optional PEFT adapter.

    Tools that load the model in torch (llm-compressor, the importance matrix) get a folder:
    the model itself, or — for base + adapter or a model in memory — a merged copy written
    once by the HF checkpoint writer into a temporary folder beside the outputs and removed
    when the build ends."""

    def __init__(self, model: Any, adapter: Any = None, name: str | None = None) -> None:
        from quantkit.checkpoint import Checkpoint

        self.model = model
        self.adapter = adapter
        self.in_memory = isinstance(model, Checkpoint)
        self.folder = model.path if self.in_memory else Path(model)
        self.name = name
        self._merged: Path | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stem(self) -> str:
        """Output names: ``name``, else the adapter's folder for a fine-tune, else the model's."""
        from quantkit.convert.hf_to_gguf import default_name
        from quantkit.convert.lora import LoraAdapter

        if self.name:
            return self.name
        if self.adapter is not None:
            a = self.adapter
            return (a.path if isinstance(a, LoraAdapter) else Path(a)).resolve().name
        from quantkit.checkpoint import read_json

        cfg = self.model.config if self.in_memory else read_json(self.folder / "config.json")
        return default_name(self.folder, cfg if isinstance(cfg, dict) else {})

    def torch_folder(self, near: Path) -> Path:
        """An HF folder torch can load with the adapter merged in (see the class doc)."""
        if self.adapter is None and not self.in_memory:
            return self.folder
        if self._merged is None:
            from quantkit.convert.hf_checkpoint import write_hf_checkpoint
            from quantkit.targets import HFTarget

            near.mkdir(parents=True, exist_ok=True)
            work = Path(self._stack.enter_context(
                tempfile.TemporaryDirectory(prefix=".quantkit-merged-", dir=near)
            ))  # fmt: skip
            self._merged = work / self.stem()
            write_hf_checkpoint(self.model, HFTarget(), self._merged, adapter=self.adapter)
        return self._merged


# (source, its targets, out, options, whether out names the one artifact itself)
Builder = Callable[[Source, list[Any], "Path | None", ExportOptions, bool], BuildResult]


def _out_folder(out: Path | None) -> Path:
    """Where scratch files go: beside the outputs (the same disk, room checked there)."""
    return out.parent if out is not None else Path.cwd()


def build_gguf(
    src: Source, targets: list[Any], out: Path | None, o: ExportOptions, single: bool
) -> BuildResult:
    """GGUF files, gguf:auto mixes and the adapter itself: quantkit's converter (convert/)."""
    from quantkit.convert import QuantSettings, convert
    from quantkit.quantize.gguf.quantizer import QuantizeOptions, parse_overrides

    ggufs = [t for t in targets if isinstance(t, GGUFTarget)]
    shared = {_quant_fields(t) for t in ggufs}
    if len(shared) > 1:
        raise InputError(
            "GGUF targets made together share their tensor options (overrides, output and "
            "embedding types, pure, leave_output)",
            "make them in separate runs, or as separate recipe targets",
        )
    q = dict(next(iter(shared))) if shared else {}
    calib, imatrix = o.calib, o.imatrix
    if calib is not None and (src.adapter is not None or src.in_memory):
        # the fine-tune's matrix, from its merged copy; float targets need none
        imatrix = _fine_tune_imatrix(src, out, o) if _quantizes(targets) else imatrix
        calib = None
    qs = QuantSettings(
        options=QuantizeOptions(
            threads=o.threads,
            output_type=q.get("output_type"),
            embedding_type=q.get("embedding_type"),
            pure=bool(q.get("pure")),
            leave_output=bool(q.get("leave_output")),
            overrides=parse_overrides(q.get("overrides", ())),
        ),
        imatrix_file=imatrix,
        calib=calib,
        calib_ctx=o.calib_ctx,
        calib_chunks=o.calib_chunks,
        no_fallback=o.no_fallback,
    )
    res = convert(
        src.model, targets, out, force=o.force, allow_pickle=o.allow_pickle, threads=o.threads,
        progress=o.progress, quant=qs, dry_run=o.dry_run, converter=o.converter,
        clamp_f16=o.clamp_f16, adapter=src.adapter, name=o.name,
    )  # fmt: skip
    by_label = {t.label(): t for t in targets}
    arts = [_gguf_artifact(a, by_label.get(a.type), o.dry_run) for a in res.artifacts]
    return BuildResult(arts, res.architecture, res.warnings, res.notes, dict(res.timings), gguf=res)


def _quant_fields(t: GGUFTarget) -> tuple[tuple[str, Any], ...]:
    keys = ("overrides", "output_type", "embedding_type", "pure", "leave_output")
    return tuple((k, getattr(t, k)) for k in keys)


def _quantizes(targets: list[Any]) -> bool:
    return any(isinstance(t, GGUFTarget) and (t.is_auto or t.gguf_type.quantized) for t in targets)


def _fine_tune_imatrix(src: Source, out: Path | None, o: ExportOptions) -> Path:
    """The importance matrix of the fine-tune (base + adapter, or a model in memory), collected
    on its merged copy and saved beside it for the quantizer."""
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.text import read_text

    assert o.calib is not None
    folder = src.torch_folder(_out_folder(out))
    im = collect_imatrix(
        folder, read_text(o.calib), ctx=o.calib_ctx, chunks=o.calib_chunks, threads=o.threads,
        progress=o.progress,
    )  # fmt: skip
    path = folder.parent / "imatrix.gguf"
    save_imatrix(im, path)
    return path


def _gguf_artifact(a: Any, target: Any, dry: bool) -> Artifact:
    from quantkit.convert.hf_to_gguf import ADAPTER_TARGETS

    d = a.to_json()
    details = {k: d[k] for k in ("planned", "fallbacks", "auto") if k in d}
    details["tensors"] = a.n_tensors
    return Artifact(
        path=a.path,
        format=a.type if a.type in ADAPTER_TARGETS else "gguf",
        label=a.type,
        size=a.size,
        sha256="" if dry else content_sha256(a.path),
        seconds=a.seconds,
        target=target,
        audit=d.get("audit"),
        details=details,
    )


def build_vllm(
    src: Source, targets: list[Any], out: Path | None, o: ExportOptions, single: bool
) -> BuildResult:
    """GPTQ / AWQ / FP8 checkpoints: llm-compressor in its own environment (quantize/vllm/),
    from the model's folder (a fine-tune: its merged copy)."""
    from quantkit.quantize.vllm import DEFAULT_IGNORE, VllmSettings, export_vllm

    settings = VllmSettings(
        ignore=o.ignore or DEFAULT_IGNORE,
        layouts=o.layouts or ("compressed-tensors",),
        calib=o.calib,
        samples=DEFAULT_SAMPLES if o.samples is None else o.samples,
        seq_len=DEFAULT_SEQ_LEN if o.seq_len is None else o.seq_len,
        threads=o.threads,
    )
    folder = src.torch_folder(_out_folder(out))
    if o.dry_run:
        return _vllm_plans(folder, targets, settings, o)
    res = export_vllm(
        folder, targets, out, settings, force=o.force, progress=o.progress, name=src.stem(),
        n_outputs=1 if single else 2,
    )  # fmt: skip
    by_label = {t.label(): t for t in targets}
    arts = [
        Artifact(
            path=a.path,
            format="vllm",
            label=a.type,
            size=a.size,
            sha256=content_sha256(a.path),
            seconds=a.seconds,
            target=by_label.get(a.type),
            details={
                "layout": a.layout,
                "quant_method": a.quant_method,
                "quantized_layers": a.quantized_layers,
                "ignored_layers": a.ignored_layers,
                **({"auto": a.auto} if a.auto is not None else {}),
            },
        )
        for a in res.artifacts
    ]
    return BuildResult(arts, res.plan.architecture, [], res.notes, dict(res.timings), vllm=res)


def _vllm_plans(folder: Path, targets: list[Any], settings: Any, o: ExportOptions) -> BuildResult:
    """A dry run of gptq:auto: each target's plan (scheme, bits and predicted KLD per fused
    group), measured and solved but not written."""
    from quantkit.quantize.vllm.auto.plan import make_plan

    arts = []
    for t in targets:
        plan, _ = make_plan(folder, t, ignore=settings.ignore, calib=settings.calib,
                            samples=settings.samples, seq_len=settings.seq_len,
                            threads=settings.threads, progress=o.progress)  # fmt: skip
        arts.append(Artifact(folder, "vllm", t.label(), 0, "", 0.0, t,
                             details={"auto": plan.to_json()}))  # fmt: skip
    return BuildResult(arts, _architecture(Source(folder)))


def build_hf(
    src: Source, targets: list[Any], out: Path | None, o: ExportOptions, single: bool
) -> BuildResult:
    """Plain HF checkpoint folders, the adapter merged while streaming (convert/hf_checkpoint.py)."""
    from quantkit.convert.hf_checkpoint import write_hf_checkpoint

    arts = []
    for t in targets:
        a = write_hf_checkpoint(
            src.model, t, out, adapter=src.adapter, force=o.force, name=src.stem(),
            out_is_folder=single, progress=o.progress,
        )  # fmt: skip
        arts.append(
            Artifact(a.path, "hf", a.type, a.size, content_sha256(a.path), a.seconds, t,
                     details={"tensors": a.n_tensors, "shards": a.n_shards})
        )  # fmt: skip
    return BuildResult(arts, _architecture(src))


# kind -> builder (quantkit/targets.py FAMILY groups the kinds a builder makes together)
BUILDERS: dict[str, Builder] = {"gguf": build_gguf, "vllm": build_vllm, "hf": build_hf}


def build(
    source: Source,
    targets: Sequence[Any],
    out: Path | None,
    options: ExportOptions,
    *,
    out_is_dir: bool = False,
) -> BuildResult:
    """Make every target (parsed Target models) from ``source``. ``out``: the file or folder
    itself when it is the only target (a ``.gguf`` path for one GGUF file), else — or with
    ``out_is_dir`` — a folder (default: the current directory) holding ``STEM-LABEL`` files
    and folders."""
    order = {id(t): i for i, t in enumerate(targets)}
    groups: dict[str, list[Any]] = {}
    for t in targets:
        groups.setdefault(FAMILY[t.method], []).append(t)
    _preflight(source, groups, options)
    single = len(targets) == 1 and not out_is_dir
    results = [BUILDERS[f](source, ts, out, options, single) for f, ts in groups.items()]
    arts = [a for r in results for a in r.artifacts]
    arts.sort(key=lambda a: order.get(id(a.target), len(order)))
    merged = BuildResult(arts, results[0].architecture)
    for r in results:
        merged.warnings += r.warnings
        merged.notes += r.notes
        merged.timings.update({k: v for k, v in r.timings.items()})
        merged.gguf = merged.gguf or r.gguf
        merged.vllm = merged.vllm or r.vllm
    return merged


def _preflight(source: Source, groups: dict[str, list[Any]], o: ExportOptions) -> None:
    """What no builder can do, named before any of them writes."""
    planned = {"gguf"} | (
        {"vllm"} if all(is_vllm_auto_target(t) for t in groups.get("vllm", [])) else set()
    )
    if o.dry_run and set(groups) - planned:
        raise InputError(
            "--dry-run applies to GGUF targets and gptq:auto",
            "leave the other vLLM and hf targets out of a dry run",
        )
    vllm_only = {"--ignore": o.ignore, "--layout": o.layouts, "--samples": o.samples,
                 "--seq-len": o.seq_len}  # fmt: skip
    given = [flag for flag, v in vllm_only.items() if v not in (None, ())]
    if given and "vllm" not in groups:
        raise InputError(
            f"{', '.join(given)} {'applies' if len(given) == 1 else 'apply'} to vLLM targets "
            f"(gptq, awq, fp8), and only {' and '.join(groups)} targets were asked",
            f"leave {'it' if len(given) == 1 else 'them'} out, or add a vLLM target (--to gptq)",
        )
    if "vllm" in groups and source.folder.suffix.lower() == ".gguf":
        raise InputError("vLLM targets are made from an HF checkpoint, not a GGUF file")


def is_vllm_auto_target(t: Any) -> bool:
    from quantkit.quantize.vllm.auto.spec import VllmAutoSpec

    return isinstance(t, VllmAutoSpec)


def _architecture(src: Source) -> str:
    from quantkit.checkpoint import read_json

    cfg = src.model.config if src.in_memory else read_json(src.folder / "config.json")
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return str(archs[0]) if isinstance(archs, list) and archs else "?"


def with_options(targets: list[Any], **gguf_options: Any) -> list[Any]:
    """The CLI's and the API's GGUF tensor options (``--tensor-type``, ``--output-type``, ...)
    set on every GGUF target; a recipe gives them per target."""
    given = {k: v for k, v in gguf_options.items() if v not in (None, (), False)}
    if not given:
        return targets
    where = "GGUF tensor options"
    return [updated(t, given, where) if isinstance(t, GGUFTarget) else t for t in targets]


__all__ = ["BUILDERS", "Artifact", "BuildResult", "ExportOptions", "Source", "build"]
