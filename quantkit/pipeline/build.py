"""Export dispatch: where every output goes, and every target kind to its builder.

``build(source, targets, out, options)`` decides the output stem (``Source.stem``) and every
output path (``place``: one ``Output`` — target, path, vLLM layout — per file or folder), then
hands each builder family its outputs — the GGUF converter (one read of the checkpoint for every
GGUF file and adapter), llm-compressor (one worker process for every vLLM checkpoint) or the HF
checkpoint writer — and returns one artifact record per output, in the order asked, each carrying
its ``Output``. The CLI (``quantkit convert``), ``quantkit.export`` and recipe steps all call it;
the converters' own entry points (``convert``, ``export_vllm``, ``write_hf_checkpoint``) place
their outputs with the same ``place``.
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
from quantkit.quantize.vllm.targets import LAYOUTS  # the first is the default
from quantkit.targets import (
    DEFAULT_SAMPLES,
    DEFAULT_SEQ_LEN,
    IMATRIX_CTX,
    GGUFTarget,
    Target,
    updated,
)

# a float GGUF input's file stem ends in its type as quantkit names float files (STEM-F16.gguf);
# what is made from it is named after the model, without it
_FLOAT_SUFFIXES = ("-F32", "-F16", "-BF16")


@dataclass(frozen=True, eq=False)
class Output:
    """One file or folder to write: the target it is made for, where it goes and, for a vLLM
    checkpoint, its layout. Decided once, by ``place``; builders write ``path`` and return
    an ``Artifact`` carrying this object."""

    target: Target
    path: Path
    layout: str | None = None  # vLLM: compressed-tensors | legacy


def place(
    targets: Sequence[Target],
    out: Path | None,
    stem: str,
    *,
    out_is_dir: bool = False,
    layouts: Sequence[str] = (),
) -> list[Output]:
    """Every output path, in the order asked (a vLLM target once per layout).

    ``out`` names the output itself when there is exactly one (a GGUF file only as ``*.gguf``;
    a vLLM adapter folder always goes inside ``out``); otherwise — or with ``out_is_dir`` —
    ``out`` (default: the current directory) is the folder holding ``STEM-LABEL`` files and
    folders (``STEM-LABEL.gguf``, ``STEM-lora-F32.gguf``, ``STEM-LABEL-legacy``)."""
    lays = tuple(dict.fromkeys(layouts)) or LAYOUTS[:1]
    pairs = [
        (t, lay)
        for t in targets
        for lay in (lays if t.family == "vllm" else (None,))  # type: ignore[union-attr]
    ]
    gguf_out = out is not None and out.suffix.lower() == ".gguf"
    if gguf_out and (len(pairs) != 1 or not _is_file(pairs[0][0])):
        raise InputError(
            f"-o {out} names one GGUF file but {len(pairs)} outputs were asked"
            if len(pairs) != 1
            else f"-o {out} names a GGUF file but {pairs[0][0].label()} writes a folder",
            "give a directory with -o when converting to several targets",
        )
    itself = out is not None and len(pairs) == 1 and not out_is_dir
    if itself and pairs[0][0].method != "vllm-lora" and (gguf_out or not _is_file(pairs[0][0])):
        return [Output(pairs[0][0], out, pairs[0][1])]  # type: ignore[arg-type]
    folder = out if out is not None else Path.cwd()
    return [Output(t, folder / _name(t, stem, lay), lay) for t, lay in pairs]


def _is_file(t: Target) -> bool:
    """GGUF files and the GGUF LoRA are files; everything else is a folder."""
    return t.method in ("gguf", "gguf-lora")


def _name(t: Target, stem: str, layout: str | None) -> str:
    if t.method == "gguf-lora":
        return f"{stem}-lora-F32.gguf"  # the adapter's tensors are written in F32
    if _is_file(t):
        return f"{stem}-{t.label()}.gguf"
    return f"{stem}-{t.label()}{'-legacy' if layout == 'legacy' else ''}"


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
    target: Target | None = None  # the Target it was made for
    output: Output | None = None  # where ``place`` put it (``target`` is its target)
    audit: dict[str, Any] | None = None  # GGUF: types, bits per weight, fallbacks
    metrics: dict[str, Any] | None = None  # its validation report entry, when asked
    details: dict[str, Any] = field(default_factory=dict)  # what only this format has

    def to_json(self) -> dict[str, Any]:
        skip = ("target", "output", "details")
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
        self._stem: str | None = None
        self._merged: Path | None = None
        self._stack = ExitStack()

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def stem(self) -> str:
        """The output stem (and a converted model's general.name), decided once."""
        if self._stem is None:
            self._stem = self._decide_stem()
        return self._stem

    def _decide_stem(self) -> str:
        """``name``; a model in memory: its ``_name_or_path``, else "model"; the adapter's folder
        for a fine-tune; a float GGUF input's file name without its type; the model's name."""
        from quantkit.hub import model_name

        if self.name:
            return self.name
        if self.in_memory:  # its folder is a temporary one: no name there
            cfg = self.model.config
            return model_name(Path("model"), cfg) if isinstance(cfg, dict) else "model"
        if self.adapter is not None:
            a = self.adapter
            return Path(getattr(a, "path", a)).resolve().name  # a folder, or a LoraAdapter
        if not self.in_memory and self.folder.suffix.lower() == ".gguf":
            stem = self.folder.stem
            return next((stem[: -len(s)] for s in _FLOAT_SUFFIXES if stem.endswith(s)), stem)
        from quantkit.checkpoint import read_json
        from quantkit.errors import QuantkitError

        try:
            cfg = read_json(self.folder / "config.json")
        except QuantkitError:  # the builder's preflight says what is wrong with the folder
            cfg = {}
        return model_name(self.folder, cfg if isinstance(cfg, dict) else {})

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


# (source, the family's outputs, options) -> one artifact per output, carrying it
Builder = Callable[[Source, list[Output], ExportOptions], BuildResult]


def _near(outputs: list[Output]) -> Path:
    """Where scratch files go: beside the outputs (the same disk, room checked there)."""
    return outputs[0].path.parent


def build_gguf(src: Source, outputs: list[Output], o: ExportOptions) -> BuildResult:
    """GGUF files, gguf:auto mixes and the adapter itself: quantkit's converter (convert/)."""
    from quantkit.convert.hf_to_gguf import convert_placed
    from quantkit.convert.quantized import QuantSettings
    from quantkit.quantize.gguf.quantizer import QuantizeOptions, parse_overrides

    targets = [x.target for x in outputs]
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
        imatrix = _fine_tune_imatrix(src, _near(outputs), o) if _quantizes(targets) else imatrix
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
    res = convert_placed(
        src.model, outputs, src.stem(), force=o.force, allow_pickle=o.allow_pickle,
        threads=o.threads, progress=o.progress, quant=qs, dry_run=o.dry_run,
        converter=o.converter, clamp_f16=o.clamp_f16, adapter=src.adapter, name=o.name,
    )  # fmt: skip
    arts = [_gguf_artifact(a, x, o.dry_run) for a, x in zip(res.artifacts, outputs, strict=True)]
    return BuildResult(arts, res.architecture, res.warnings, res.notes, dict(res.timings), gguf=res)


def _quant_fields(t: GGUFTarget) -> tuple[tuple[str, Any], ...]:
    keys = ("overrides", "output_type", "embedding_type", "pure", "leave_output")
    return tuple((k, getattr(t, k)) for k in keys)


def _quantizes(targets: list[Target]) -> bool:
    return any(isinstance(t, GGUFTarget) and (t.is_auto or t.gguf_type.quantized) for t in targets)


def _fine_tune_imatrix(src: Source, near: Path, o: ExportOptions) -> Path:
    """The importance matrix of the fine-tune (base + adapter, or a model in memory), collected
    on its merged copy and saved beside it for the quantizer."""
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.text import read_text

    assert o.calib is not None
    folder = src.torch_folder(near)
    im = collect_imatrix(
        folder, read_text(o.calib), ctx=o.calib_ctx, chunks=o.calib_chunks, threads=o.threads,
        progress=o.progress,
    )  # fmt: skip
    path = folder.parent / "imatrix.gguf"
    save_imatrix(im, path)
    return path


def _gguf_artifact(a: Any, x: Output, dry: bool) -> Artifact:
    """The converter's record of ``x``, which it wrote at ``x.path``."""
    assert a.path == x.path
    d = a.to_json()
    details = {k: d[k] for k in ("planned", "fallbacks", "auto") if k in d}
    details["tensors"] = a.n_tensors
    return Artifact(
        path=a.path,
        format=x.target.method,  # gguf, gguf-lora or vllm-lora
        label=a.type,
        size=a.size,
        sha256="" if dry else content_sha256(a.path),
        seconds=a.seconds,
        target=x.target,
        output=x,
        audit=d.get("audit"),
        details=details,
    )


def build_vllm(src: Source, outputs: list[Output], o: ExportOptions) -> BuildResult:
    """GPTQ / AWQ / FP8 checkpoints: llm-compressor in its own environment (quantize/vllm/),
    from the model's folder (a fine-tune: its merged copy)."""
    from quantkit.quantize.vllm import DEFAULT_IGNORE, VllmSettings
    from quantkit.quantize.vllm.export import export_placed

    settings = VllmSettings(
        ignore=o.ignore or DEFAULT_IGNORE,
        layouts=o.layouts or ("compressed-tensors",),
        calib=o.calib,
        samples=DEFAULT_SAMPLES if o.samples is None else o.samples,
        seq_len=DEFAULT_SEQ_LEN if o.seq_len is None else o.seq_len,
        threads=o.threads,
    )
    folder = src.torch_folder(_near(outputs))
    if o.dry_run:
        return _vllm_plans(folder, outputs, settings, o)
    res = export_placed(folder, outputs, settings, force=o.force, progress=o.progress)
    arts = [
        Artifact(
            path=a.path,
            format="vllm",
            label=a.type,
            size=a.size,
            sha256=content_sha256(a.path),
            seconds=a.seconds,
            target=x.target,
            output=x,
            details={
                "layout": a.layout,
                "quant_method": a.quant_method,
                "quantized_layers": a.quantized_layers,
                "ignored_layers": a.ignored_layers,
                **({"auto": a.auto} if a.auto is not None else {}),
            },
        )
        for a, x in zip(res.artifacts, outputs, strict=True)
    ]
    return BuildResult(arts, res.plan.architecture, [], res.notes, dict(res.timings), vllm=res)


def _vllm_plans(
    folder: Path, outputs: list[Output], settings: Any, o: ExportOptions
) -> BuildResult:
    """A dry run of gptq:auto: each target's plan (scheme, bits and predicted KLD per fused
    group), measured and solved but not written, and the candidates selection would measure."""
    from quantkit.quantize.vllm.auto.plan import make_plan
    from quantkit.quantize.vllm.auto.select import dry_run

    arts = []
    for x in outputs:
        t = x.target
        plan, groups = make_plan(folder, t, ignore=settings.ignore, calib=settings.calib,
                                 samples=settings.samples, seq_len=settings.seq_len,
                                 threads=settings.threads, progress=o.progress)  # fmt: skip
        auto = {**plan.to_json(), "selection": dry_run(plan, groups).to_json()}
        arts.append(Artifact(x.path, "vllm", t.label(), 0, "", 0.0, t, x,
                             details={"auto": auto}))  # fmt: skip
    return BuildResult(arts, _architecture(Source(folder)))


def build_hf(src: Source, outputs: list[Output], o: ExportOptions) -> BuildResult:
    """Plain HF checkpoint folders, the adapter merged while streaming (convert/hf_checkpoint.py)."""
    from quantkit.convert.hf_checkpoint import write_hf_checkpoint

    arts = []
    for x in outputs:
        a = write_hf_checkpoint(
            src.model, x.target, x.path, adapter=src.adapter, force=o.force,
            progress=o.progress,
        )  # fmt: skip
        arts.append(
            Artifact(a.path, "hf", a.type, a.size, content_sha256(a.path), a.seconds, x.target,
                     x, details={"tensors": a.n_tensors, "shards": a.n_shards})
        )  # fmt: skip
    return BuildResult(arts, _architecture(src))


# a target's ``family`` (quantkit/targets.py) -> the builder that makes that family's targets
# together (one read of the checkpoint; one llm-compressor process)
BUILDERS: dict[str, Builder] = {"gguf": build_gguf, "vllm": build_vllm, "hf": build_hf}


def build(
    source: Source,
    targets: Sequence[Target],
    out: Path | None,
    options: ExportOptions,
    *,
    out_is_dir: bool = False,
) -> BuildResult:
    """Make every target (parsed Target models) from ``source``, each where ``place`` puts it
    (``out``: the output itself when there is one, else the folder holding them)."""
    groups: dict[str, list[Target]] = {}
    for t in targets:
        groups.setdefault(t.family, []).append(t)  # type: ignore[union-attr]
    _preflight(source, groups, options)
    outputs = place(targets, out, source.stem(), out_is_dir=out_is_dir, layouts=options.layouts)
    results = [
        BUILDERS[f](source, [x for x in outputs if x.target.family == f], options)  # type: ignore[union-attr]
        for f in groups
    ]
    made = {id(a.output): a for r in results for a in r.artifacts}
    merged = BuildResult([made[id(x)] for x in outputs], results[0].architecture)
    for r in results:
        merged.warnings += r.warnings
        merged.notes += r.notes
        merged.timings.update({k: v for k, v in r.timings.items()})
        merged.gguf = merged.gguf or r.gguf
        merged.vllm = merged.vllm or r.vllm
    return merged


def _preflight(source: Source, groups: dict[str, list[Target]], o: ExportOptions) -> None:
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


def is_vllm_auto_target(t: Target) -> bool:
    from quantkit.quantize.vllm.auto.spec import VllmAutoSpec

    return isinstance(t, VllmAutoSpec)


def _architecture(src: Source) -> str:
    from quantkit.checkpoint import read_json

    cfg = src.model.config if src.in_memory else read_json(src.folder / "config.json")
    archs = cfg.get("architectures") if isinstance(cfg, dict) else None
    return str(archs[0]) if isinstance(archs, list) and archs else "?"


def with_options(targets: list[Target], **gguf_options: Any) -> list[Target]:
    """The CLI's and the API's GGUF tensor options (``--tensor-type``, ``--output-type``, ...)
    set on every GGUF target; a recipe gives them per target."""
    given = {k: v for k, v in gguf_options.items() if v not in (None, (), False)}
    if not given:
        return targets
    where = "GGUF tensor options"
    return [updated(t, given, where) if isinstance(t, GGUFTarget) else t for t in targets]


__all__ = [
    "BUILDERS", "Artifact", "BuildResult", "ExportOptions", "Output", "Source", "build", "place",
]  # fmt: skip
