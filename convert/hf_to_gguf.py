"""HF checkpoint → GGUF, streaming one tensor at a time.

Flow (docs/architecture.md, "The pipeline"): preflight everything that can fail cheaply (output paths, config,
architecture, every tensor's presence and shape, tokenizer) before writing a byte; then one pass
over the checkpoint writes every requested float file (F32/F16/BF16) at once, each tensor read
through the memory map, transformed, cast, written and released before the next; quantized
types are then made from one float base by llama.cpp's quantizer. Every file appears under its
final name only when complete.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import gguf
import numpy as np

from quantkit.atomic import atomic_output, check_writable, output_dirs, scratch_file
from quantkit.casts import F16_MAX, to_f32
from quantkit.checkpoint import Checkpoint
from quantkit.convert.archs import Architecture, resolve
from quantkit.convert.archs.base import PlannedTensor
from quantkit.convert.cast import rows as cast_rows
from quantkit.convert.loadcheck import check_gguf_vocab, check_loads, check_name_rules
from quantkit.convert.quantized import Artifact, QuantSettings, with_imatrix, write_checked
from quantkit.convert.quantized import preflight_imatrix as _preflight_imatrix
from quantkit.convert.quantized import quantize_one as _quantize_one
from quantkit.convert.tokenizer import Vocab, load_vocab, write_vocab
from quantkit.convert.writer import WRITE_AHEAD, GGUFWriter
from quantkit.diskspace import check_free_space
from quantkit.errors import CheckpointError, InputError
from quantkit.hub import model_name
from quantkit.progress import Progress
from quantkit.quantize.gguf.audit import Audit, file_type_of
from quantkit.quantize.gguf.auto.spec import AutoSpec
from quantkit.quantize.gguf.quantizer import QuantizeOptions
from quantkit.quantize.gguf.types import GGUF_TYPES, TRAINED_ONLY_KLD, GGUFType, base_type
from quantkit.text import read_text

if TYPE_CHECKING:
    from quantkit.pipeline.build import Output
    from quantkit.targets import Target

# base file type -> (ggml type of 2-D weights, numpy storage dtype)
BASE_STORAGE: dict[str, tuple[gguf.GGMLQuantizationType, np.dtype]] = {
    "F32": (gguf.GGMLQuantizationType.F32, np.dtype(np.float32)),
    "F16": (gguf.GGMLQuantizationType.F16, np.dtype(np.float16)),
    "BF16": (gguf.GGMLQuantizationType.BF16, np.dtype(np.uint16)),
}


@dataclass
class ConvertResult:
    artifacts: list[Artifact]
    architecture: str
    unused_tensors: list[str] = field(default_factory=list)
    read_bytes: int = 0
    timings: dict[str, float] = field(default_factory=dict)  # preflight / stream / quantize, s
    imatrix: Any = None  # the importance matrix used (quantize.imatrix.Imatrix), if any
    converter: str = "native"  # or "upstream": llama.cpp's own converter (convert/upstream.py)
    notes: list[str] = field(default_factory=list)  # things the user should know (tokenizer, ...)
    # --clamp-f16: tensors clamped to the F16 range, with their largest magnitude before
    clamped_f16: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)  # the CLI prints them on stderr


# the targets that write a LoRA adapter itself (need --adapter): a GGUF LoRA for llama.cpp,
# an adapter directory for vLLM
LORA_TARGET = "gguf-lora"
VLLM_LORA_TARGET = "vllm-lora"
ADAPTER_TARGETS = (LORA_TARGET, VLLM_LORA_TARGET)


@dataclass
class _Outputs:
    """The placed outputs of one converter run (quantkit/pipeline/build.py ``place``) by what
    makes them: float and quantized file types, gguf:auto budgets, the two adapter outputs."""

    placed: list[Output]  # in the order asked
    types: list[GGUFType] = field(default_factory=list)
    paths: dict[str, Path] = field(default_factory=dict)  # by type name
    autos: list[AutoSpec] = field(default_factory=list)
    apaths: dict[AutoSpec, Path] = field(default_factory=dict)
    lora_path: Path | None = None
    vllm_path: Path | None = None

    @classmethod
    def of(cls, placed: Sequence[Output]) -> _Outputs:
        o = cls(list(placed))
        for x in placed:
            t = x.target
            if t.family != "gguf":
                raise InputError(
                    f"convert() writes GGUF files and adapters, not {t.label()}",
                    "quantkit.export (and `quantkit convert`) make every kind of target",
                )
            if t.method == LORA_TARGET:
                o.lora_path = x.path
            elif t.method == VLLM_LORA_TARGET:
                o.vllm_path = x.path
            elif t.is_auto:
                o.autos.append(t.auto_spec())
                o.apaths[o.autos[-1]] = x.path
            else:
                o.types.append(t.gguf_type)
                o.paths[t.type] = x.path
        return o

    def in_order(self, artifacts: list[Artifact]) -> list[Artifact]:
        """The artifacts written, in the order the outputs were asked (each at its path)."""
        made = {a.path: a for a in artifacts}
        return [made[x.path] for x in self.placed]


class _Sink:
    """One float output file being written: its writer and target storage type."""

    def __init__(
        self,
        path: Path,
        base: str,
        arch: Architecture,
        vocab: Vocab,
        name: str,
        base_model: str | None = None,
    ):
        self.path = path
        self.base = base
        self.qtype, self.dtype = BASE_STORAGE[base]
        self.writer = GGUFWriter(path, arch.arch_name, use_temp_file=False)
        w = self.writer
        w.add_name(name)
        if base_model:  # a merged fine-tune: which base it came from (the model card's field)
            w.add_base_model_count(1)
            w.add_base_model_name(0, base_model)
        w.add_file_type(int(GGUF_TYPES[base].ftype))
        arch.write_hparams(w)
        write_vocab(w, vocab)

    def storage(self, keep_f32: bool) -> tuple[gguf.GGMLQuantizationType, np.dtype]:
        if keep_f32:
            return gguf.GGMLQuantizationType.F32, np.dtype(np.float32)
        return self.qtype, self.dtype


# dtype -> (unsigned view, mask without the sign bit, exponent mask). A value is finite iff
# (bits & ~sign) < exponent-all-ones (IEEE 754); a max over the masked bits finds any Inf/NaN
# without a float conversion or a boolean array (several times faster than np.isfinite on F16).
EXPONENT_BITS: dict[str, tuple[type, int, int]] = {
    "F16": (np.uint16, 0x7FFF, 0x7C00),
    "BF16": (np.uint16, 0x7FFF, 0x7F80),
    "F32": (np.uint32, 0x7FFFFFFF, 0x7F800000),
    "F64": (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}
CHUNK = 1 << 22  # elements per step: keeps the temporary small and in cache


def _finite(raw: np.ndarray, dtype: str) -> bool:
    if dtype not in EXPONENT_BITS or raw.size == 0:
        return True
    view, body, exp = EXPONENT_BITS[dtype]
    flat = raw.reshape(-1).view(view)
    tmp = np.empty(min(CHUNK, flat.size), dtype=view)
    for i in range(0, flat.size, CHUNK):
        part = flat[i : i + CHUNK]
        out = tmp[: part.size]
        np.bitwise_and(part, view(body), out=out)
        if out.max() >= exp:
            return False
    return True


# Elements per cast block: a float32 scratch of 1 MiB stays in L2 (1 MiB per core on Zen 4 and
# Skylake-SP and later). Measured on a BF16 → F16 tensor on a Zen 4 with blocks of 2^12..2^18:
# the ctypes call into ggml costs about a microsecond, so blocks below 2^16 pay for it, and 2^18
# was fastest.
CAST_BLOCK = 1 << 18
# float32 bits of 65504.0: |x| > F16_MAX iff (bits & ~sign) > this. BF16 bits are the top half
# of the float32's, so the same test applies to them shifted left by 16.
F16_MAX_BITS = 0x477FE000
NAN_HINT = "the checkpoint is corrupt or diverged in training; fix the weights first"


def _cast(
    raw: np.ndarray,
    src: str,
    dst: np.dtype,
    tensor: str,
    clamped: dict[str, float] | None = None,
    where: str = "",
) -> Iterator[np.ndarray]:
    """Stored array (BF16 as uint16) → the output storage dtype (BF16 as uint16), as 1-D blocks
    of at most CAST_BLOCK elements, in order. A block's memory is reused WRITE_AHEAD + 1 blocks
    later (the writer has written it by then), so memory stays at a few blocks whatever the
    tensor's size.

    Every block is checked finite (one masked max over its bits, which for BF16 and F32 also
    gives the largest magnitude for the F16 range). A value beyond the F16 range is an error,
    unless ``clamped`` is given: then the tensor is clamped to ±65504 and recorded there with
    its largest magnitude."""
    flat = raw.reshape(-1)  # a copy only for a non-contiguous array (a permuted Q/K)
    if flat.size == 0:
        return
    n = min(CAST_BLOCK, flat.size)
    view, body, exp = EXPONENT_BITS[src]
    bits = np.empty(n, view)
    same = (src, dst) in (("F16", np.float16), ("BF16", np.uint16), ("F32", np.float32))
    ring = WRITE_AHEAD + 1
    rows = cast_rows()
    scratch = [np.empty(n, np.float32) for _ in range(1 if dst != np.float32 else ring)]
    outs = [np.empty(n, dst) for _ in range(ring)] if dst != np.float32 else scratch
    for j, i in enumerate(range(0, flat.size, CAST_BLOCK)):
        part = flat[i : i + CAST_BLOCK]
        k = part.size
        top = int(np.bitwise_and(part.view(view), view(body), out=bits[:k]).max())
        if top >= exp:
            raise CheckpointError(f"{where}tensor {tensor!r} contains NaN or Inf", NAN_HINT)
        if same:
            yield part
            continue
        block = scratch[j % len(scratch)][:k]
        if src == "BF16":
            rows["bf16_to_f32"](part, block)
        elif src == "F16":
            rows["f16_to_f32"](part, block)
        else:  # F32 (the only other dtype that streams: _check_dtypes)
            block = part  # read in place; copied into the scratch only to be clamped
        out = outs[j % ring][:k]
        if dst == np.float16:
            if src == "BF16":
                top <<= 16
            if src != "F16" and top > F16_MAX_BITS:
                big = float(np.uint32(top).view(np.float32))
                if clamped is None:
                    raise CheckpointError(
                        f"{where}tensor {tensor!r} has values up to {big:.4g}, beyond the F16 range (±65504)",
                        "convert to gguf:BF16 or gguf:F32 instead (or pass --clamp-f16 to clamp them)",
                    )
                clamped[tensor] = max(big, clamped.get(tensor, 0.0))
                block = np.clip(block, -F16_MAX, F16_MAX, out=scratch[0][:k])
            rows["f32_to_f16"](block, out)
        elif dst == np.uint16:  # F32 → BF16 with round-to-nearest-even, as gguf-py's quants
            rows["f32_to_bf16"](block, out)
        yield block if dst == np.float32 else out


def convert(
    model: str | os.PathLike[str] | Checkpoint,
    targets: Sequence[str | Target],
    out: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    quant: QuantSettings | None = None,
    dry_run: bool = False,
    converter: str = "auto",
    clamp_f16: bool = False,
    adapter: Any = None,
    name: str | None = None,
) -> ConvertResult:
    """Convert a local HF checkpoint to one GGUF file per target type.

    ``targets``: ``--to`` texts or Target models of the GGUF family; ``out``: the file (one
    target, ``*.gguf``) or the folder holding ``STEM-TYPE.gguf`` files, placed by
    quantkit/pipeline/build.py ``place`` as every entry point places them.

    ``clamp_f16``: values beyond the F16 range are clamped (listed in ``clamped_f16``) instead of
    failing the conversion.

    ``dry_run``: write nothing; each artifact carries the planned per-tensor types and the
    predicted size (llama.cpp's own dry run for quantized types).
    ``converter``: "native" (quantkit's architecture classes), "upstream" (llama.cpp's own
    convert_hf_to_gguf.py of the engine's version), "auto" (native when a class exists).

    ``adapter``: a PEFT LoRA adapter directory, merged into the weights while they stream
    (its tokenizer and chat template win over the base's); the ``gguf-lora`` target writes the
    adapter itself as a GGUF LoRA for the base's GGUF. ``model`` may be an open ``Checkpoint``
    (quantkit.export streams a model in memory that way) and ``adapter`` a ``LoraAdapter``.
    ``name``: general.name and the output file stem (default: the model's or adapter's name).
    """
    from quantkit.pipeline.build import Source, place
    from quantkit.targets import parse_targets

    ts = parse_targets(targets)
    stem = Source(model, adapter, name).stem()
    outputs = place(ts, Path(out) if out is not None else None, stem)
    return convert_placed(model, outputs, stem, force=force, allow_pickle=allow_pickle,
                          threads=threads, progress=progress, quant=quant, dry_run=dry_run,
                          converter=converter, clamp_f16=clamp_f16, adapter=adapter, name=name)  # fmt: skip


def convert_placed(
    model: str | os.PathLike[str] | Checkpoint,
    outputs: Sequence[Output],
    stem: str,
    *,
    force: bool = False,
    allow_pickle: bool = False,
    threads: int | None = None,
    progress: Progress | None = None,
    quant: QuantSettings | None = None,
    dry_run: bool = False,
    converter: str = "auto",
    clamp_f16: bool = False,
    adapter: Any = None,
    name: str | None = None,
) -> ConvertResult:
    """``convert`` of outputs already placed (quantkit/pipeline/build.py ``Output``: target
    and path), ``stem`` as general.name; the artifacts come back in the outputs' order."""
    outs = _Outputs.of(outputs)
    types, autos = outs.types, outs.autos
    want_lora, want_vllm = outs.lora_path is not None, outs.vllm_path is not None
    if (want_lora or want_vllm) and adapter is None:
        which = LORA_TARGET if want_lora else VLLM_LORA_TARGET
        raise InputError(f"--to {which} needs --adapter DIR", "pass the PEFT adapter folder")
    qs = quant or QuantSettings()
    given = model if isinstance(model, Checkpoint) else None
    model_dir = given.path if given is not None else Path(model)  # type: ignore[arg-type]
    t_start = time.perf_counter()
    if model_dir.is_file() and model_dir.suffix.lower() == ".gguf":
        _refuse_for_gguf(adapter, name)
        return requantize(model_dir, outs, force=force, progress=progress, quant=qs,
                          dry_run=dry_run)  # fmt: skip
    if _use_upstream(model_dir, converter):
        from quantkit.convert.upstream import convert_upstream

        _refuse_for_upstream(autos, adapter, given)
        res = convert_upstream(model_dir, types, outs.paths, force=force,
                               allow_pickle=allow_pickle, threads=threads, progress=progress,
                               quant=qs, dry_run=dry_run, name=name)  # fmt: skip
        res.artifacts = outs.in_order(res.artifacts)
        return res
    with ExitStack() as held:  # the checkpoint and the adapter are closed on every way out
        ckpt = held.enter_context(given or Checkpoint.open(model_dir, allow_pickle=allow_pickle))
        lora = _open_adapter(adapter, qs, held) if adapter is not None else None
        job = _preflight(ckpt, lora, model_dir, outs, stem, qs=qs, force=force, dry_run=dry_run)
        timings = {"preflight": time.perf_counter() - t_start}
        options = _quantize_options(job, qs, model_dir, timings, threads=threads, progress=progress)
        return _write(job, options, qs, timings, force=force, dry_run=dry_run, threads=threads,
                      progress=progress, clamp_f16=clamp_f16)  # fmt: skip


def _refuse_for_gguf(adapter: Any, name: str | None) -> None:
    """What a float GGUF input cannot take: both need the HF checkpoint."""
    if adapter is not None:
        raise InputError(
            "--adapter needs the HF base checkpoint, not a GGUF",
            f"convert the base folder with --adapter, or use --to {LORA_TARGET} and load both in llama.cpp",
        )
    if name is not None:
        raise InputError(
            "--name sets the name of a model converted from its HF checkpoint; a GGUF input "
            "keeps its own",
            "convert the HF checkpoint with --name instead",
        )


def _refuse_for_upstream(autos: Sequence[AutoSpec], adapter: Any, given: Checkpoint | None) -> None:
    """What llama.cpp's converter cannot take: it reads a checkpoint folder, nothing else."""
    if autos:
        raise InputError(
            "gguf:auto needs a native architecture (or a float GGUF as input)",
            "convert to gguf:F16 first, then run gguf:auto on that file with --imatrix",
        )
    if adapter is not None or given is not None:
        raise InputError(
            "llama.cpp's converter (the fallback) takes only a checkpoint folder, no adapter",
            "merge the adapter into a saved HF copy first (peft merge_and_unload), then convert it",
        )


@dataclass
class _Job:
    """A native conversion that passed its preflight: what to read, and what to write where."""

    ckpt: Checkpoint
    lora: Any  # the open LoraAdapter, or None
    arch: Architecture
    plan: list[PlannedTensor]
    vocab: Vocab
    stem: str
    base_model: str | None  # general.base_model of a merged fine-tune
    outputs: _Outputs
    base_name: str | None  # the float type quantized targets are made from, if any
    imatrix: Any
    warnings: list[str]

    @property
    def types(self) -> list[GGUFType]:
        return self.outputs.types

    @property
    def autos(self) -> list[AutoSpec]:
        return self.outputs.autos

    @property
    def paths(self) -> dict[str, Path]:
        return self.outputs.paths

    @property
    def apaths(self) -> dict[AutoSpec, Path]:
        return self.outputs.apaths

    @property
    def lora_path(self) -> Path | None:
        return self.outputs.lora_path

    @property
    def vllm_path(self) -> Path | None:
        return self.outputs.vllm_path

    @property
    def floats(self) -> list[GGUFType]:
        return [t for t in self.types if t.base]

    @property
    def quants(self) -> list[GGUFType]:
        return [t for t in self.types if not t.base]

    def first_made_from_base(self) -> Path:
        """The first output made from the base: where a scratch base goes, and what it is named
        after in messages."""
        return self.paths[self.quants[0].name] if self.quants else next(iter(self.apaths.values()))


def _preflight(
    ckpt: Checkpoint,
    lora: Any,
    model_dir: Path,
    outs: _Outputs,
    stem: str,
    *,
    qs: QuantSettings,
    force: bool,
    dry_run: bool,
) -> _Job:
    """Everything that can fail cheaply, before a byte is written."""
    types, autos = outs.types, outs.autos
    want_lora, want_vllm = outs.lora_path is not None, outs.vllm_path is not None
    warnings: list[str] = []
    available = {n: t.shape for n, t in ckpt.tensors.items()}
    config = ckpt.config
    if lora is not None:
        warnings += _adapter_warnings(lora, model_dir, config)
        config = lora.merged_config(config)
    arch = resolve(config, ckpt.path / "config.json")
    if not dry_run:
        for x in outs.placed:
            check_writable(x.path, force=force)
    if lora is not None:
        available = _check_adapter(lora, arch, available, want_lora, want_vllm)
    plan = arch.plan(available)
    tok_dir = lora.path if lora is not None and lora.has_tokenizer else model_dir
    base_model = (lora.base_name or model_name(model_dir, ckpt.config)) if lora else None
    vocab = load_vocab(tok_dir, vocab_size=arch.h.n_vocab, config_dir=model_dir)
    if types:  # model files; a GGUF LoRA is not loaded as a model, no vocabulary of its own
        check_name_rules(stem, vocab.tokens, arch=arch.arch_name, pre=vocab.pre)
    _check_dtypes(ckpt, plan)
    quants = [t for t in types if not t.base]
    warnings += _trained_type_warnings(ckpt, quants)
    imatrix = _preflight_imatrix(quants, qs, dry_run, autos)
    job = _Job(ckpt, lora, arch, plan, vocab, stem, base_model, outs,
               _base_name(ckpt, types, autos), imatrix, warnings)  # fmt: skip
    if not dry_run:
        _check_space(job)
    return job


def _trained_type_warnings(ckpt: Checkpoint, quants: list[GGUFType]) -> list[str]:
    """Binary / ternary file types asked of a float model: one warning each, with the quality
    they cost (types.py GGUFType.trained_levels)."""
    out = []
    for t in quants:
        if t.trained_levels is None:
            continue
        levels = _levels_per_block(ckpt, t.block)
        if levels is not None and levels <= t.trained_levels:
            continue  # weights already binary / ternary per block: a model trained for the type
        kind = "binary" if t.trained_levels == 2 else "ternary"
        seen = f"{levels} distinct values in a block of {t.block}" if levels else "float weights"
        out.append(
            f"{t.name} is for models trained with {kind} weights; this model has {seen}, so it "
            f"loses most of its quality in {t.name} ({TRAINED_ONLY_KLD.get(t.name, '')})"
        )
    return out


def _levels_per_block(ckpt: Checkpoint, block: int) -> int | None:
    """The most distinct stored values in one ``block`` of a layer weight's first rows (read
    through the memory map as stored, so a few KB), or None if no layer weight fits blocks."""
    for name in sorted(ckpt.tensors):
        info = ckpt.tensors[name]
        if len(info.shape) != 2 or "layers." not in name or info.shape[-1] % block:
            continue
        rows = np.sort(np.asarray(ckpt.raw(name)[:16]).reshape(-1, block), axis=1)
        ckpt.release(name)
        return int((np.diff(rows, axis=1) != 0).sum(axis=1).max()) + 1
    return None


def _check_adapter(
    lora: Any,
    arch: Architecture,
    available: dict[str, tuple[int, ...]],
    want_lora: bool,
    want_vllm: bool,
) -> dict[str, tuple[int, ...]]:
    """The adapter fits the base and the adapter targets asked; the merged model's shapes."""
    expected = arch.expected()
    lora.check_base({n: s for n, s in available.items() if n in expected})
    available = lora.shapes(available)
    if want_lora:
        _check_gguf_lora(lora, arch)
    if want_vllm:
        _check_vllm_lora(lora)
    return available


def _check_dtypes(ckpt: Checkpoint, plan: list[PlannedTensor]) -> None:
    """Only float weights stream into a GGUF; a quantized checkpoint is refused up front."""
    for pt in plan:
        for source in pt.sources or ([pt.source] if pt.source else []):
            info = ckpt.tensors[source]
            if info.dtype not in BASE_STORAGE:
                raise CheckpointError(
                    f"{info.file.name}: tensor {source!r} is {info.dtype}; only F32/F16/BF16 weights convert",
                    "dequantize the checkpoint first",
                )


def _base_name(ckpt: Checkpoint, types: list[GGUFType], autos: list[AutoSpec]) -> str | None:
    """The float base quantized targets are made from (``base_type``: a requested float type
    that holds the weights exactly, else a temporary in the source's own precision). None when
    nothing is quantized."""
    if all(t.base for t in types) and not autos:
        return None
    return base_type(ckpt.source_dtype, [t.name for t in types if t.base])


def _check_space(job: _Job) -> None:
    """Room on disk for every output, and for the scratch base if no float target is it."""
    plan, vocab, floats, quants = job.plan, job.vocab, job.floats, job.quants
    planned = [(job.paths[t.name], _float_bytes(plan, t.name, vocab)) for t in floats]
    planned += [(job.paths[q.name], _quant_bytes(plan, q, vocab)) for q in quants]
    planned += [(p, a.size or _quant_bytes(plan, GGUF_TYPES["Q8_0"], vocab))
                for a, p in job.apaths.items()]  # fmt: skip
    if job.base_name is not None and job.base_name not in {t.name for t in floats}:
        planned.append((job.first_made_from_base(), _float_bytes(plan, job.base_name, vocab)))
    check_free_space(planned)


def _quantize_options(
    job: _Job,
    qs: QuantSettings,
    model_dir: Path,
    timings: dict[str, float],
    *,
    threads: int | None,
    progress: Progress | None,
) -> QuantizeOptions:
    """llama.cpp's quantize options, with the importance matrix (collected now from --calib
    text when none was given)."""
    if job.imatrix is None and qs.calib is not None and (job.quants or job.autos):
        from quantkit.quantize.gguf.imatrix import collect_imatrix

        t1 = time.perf_counter()
        job.imatrix = collect_imatrix(
            model_dir,
            read_text(qs.calib),
            ctx=qs.calib_ctx,
            chunks=qs.calib_chunks,
            threads=threads,
            progress=progress,
        )
        timings["imatrix"] = time.perf_counter() - t1
    options = with_imatrix(qs.options, job.imatrix, qs.imatrix_file)
    if threads and not options.threads:
        options = replace(options, threads=threads)
    return options


def _write(
    job: _Job,
    options: QuantizeOptions,
    qs: QuantSettings,
    timings: dict[str, float],
    *,
    force: bool,
    dry_run: bool,
    threads: int | None,
    progress: Progress | None,
    clamp_f16: bool,
) -> ConvertResult:
    """Every output of a job that passed its preflight: the float files and the base, the
    quantized types and gguf:auto files made from the base, the adapter outputs. Each appears
    under its final name only once complete (the float files when this stack closes cleanly)."""
    with ExitStack() as stack:
        if not dry_run:
            stack.enter_context(output_dirs([*job.paths.values(), *job.apaths.values()]))
        clamped: dict[str, float] | None = {} if clamp_f16 else None
        artifacts, base_path, read = _write_floats(job, stack, timings, clamped, force=force,
                                                   dry_run=dry_run, progress=progress)  # fmt: skip
        t0 = time.perf_counter()
        for q in job.quants:
            assert base_path is not None
            artifacts.append(
                _quantize_one(base_path, q, job.paths[q.name], options, qs, len(job.plan),
                              force=force, dry_run=dry_run, progress=progress)
            )  # fmt: skip
        if job.quants:
            timings["quantize"] = time.perf_counter() - t0
        for a in job.autos:
            assert base_path is not None
            t2 = time.perf_counter()
            artifacts.append(
                _auto_one(base_path, a, job.apaths[a], options, qs, force=force, dry_run=dry_run,
                          threads=threads, progress=progress,
                          checkpoint=job.ckpt if job.lora is None else None)
            )  # fmt: skip
            timings[f"auto {a.name}"] = time.perf_counter() - t2
        if job.lora is not None and job.lora_path is not None:
            artifacts.append(
                _write_lora(job.lora, job.arch, job.lora_path, job.stem, force, dry_run)
            )
        if job.lora is not None and job.vllm_path is not None:
            artifacts.append(_write_vllm_lora(job.lora, job.vllm_path, dry_run))
    return _result(job, artifacts, read, timings, clamped, dry_run)


def _result(
    job: _Job,
    artifacts: list[Artifact],
    read: int,
    timings: dict[str, float],
    clamped: dict[str, float] | None,
    dry_run: bool,
) -> ConvertResult:
    """The written files audited (the float ones from their plan) and in the order asked."""
    for a in artifacts:
        if a.audit is None and not dry_run and a.type not in ADAPTER_TARGETS:
            a.audit = _float_audit(a, job.plan)
    return ConvertResult(
        job.outputs.in_order(artifacts),
        job.arch.arch_name,
        job.arch.unused(job.ckpt.tensors),
        read,
        timings,
        job.imatrix,
        clamped_f16=clamped or {},
        warnings=job.warnings,
    )


def _open_sinks(
    job: _Job, stack: ExitStack, *, force: bool, dry_run: bool
) -> tuple[dict[str, Path], list[_Sink], Path | None]:
    """The float files being written (temporaries on ``stack``) and the base's path."""
    # atomic_output renames each float file into place when the stack closes cleanly;
    # a dry run writes only the scratch base it needs for llama.cpp's planner
    tmps = (
        {}
        if dry_run
        else {
            t.name: stack.enter_context(atomic_output(job.paths[t.name], force=force))
            for t in job.floats
        }
    )
    sinks = [
        _Sink(tmps[t.name], t.name, job.arch, job.vocab, job.stem, job.base_model)
        for t in job.floats
        if t.name in tmps
    ]
    base_path = tmps.get(job.base_name) if job.base_name else None
    if job.base_name is not None and base_path is None:
        near = job.first_made_from_base()
        if dry_run:
            near = Path(tempfile.gettempdir()) / near.name
        base_path = stack.enter_context(scratch_file(near))
        sinks.append(_Sink(base_path, job.base_name, job.arch, job.vocab, job.stem, job.base_model))
    return tmps, sinks, base_path


def _write_floats(
    job: _Job,
    stack: ExitStack,
    timings: dict[str, float],
    clamped: dict[str, float] | None,
    *,
    force: bool,
    dry_run: bool,
    progress: Progress | None,
) -> tuple[list[Artifact], Path | None, int]:
    """One pass over the checkpoint into every float file and the base, each load-checked;
    their artifacts, the base's path and the bytes read."""
    tmps, sinks, base_path = _open_sinks(job, stack, force=force, dry_run=dry_run)
    plan = job.plan
    t0 = time.perf_counter()
    read = _stream(job.ckpt, job.arch, plan, sinks, progress, clamped, job.lora) if sinks else 0
    if not dry_run:  # each float file, and the base the quantized types come from
        for t_name, tmp in tmps.items():
            check_loads(tmp, job.paths[t_name].name)
        if base_path is not None and job.base_name not in tmps:
            check_loads(base_path, f"the {job.base_name} base of {job.first_made_from_base().name}")
    elapsed = timings["stream"] = time.perf_counter() - t0
    artifacts: list[Artifact] = []
    for t in job.floats:
        if dry_run:
            planned = {pt.name: "F32" if pt.keep_f32 else t.name for pt in plan}
            size = sum(_planned_bytes(pt.shape, planned[pt.name]) for pt in plan)
            artifacts.append(
                Artifact(job.paths[t.name], t.name, size, len(plan), 0.0, planned=planned)
            )
            continue
        size = tmps[t.name].stat().st_size
        artifacts.append(Artifact(job.paths[t.name], t.name, size, len(plan), elapsed))
    return artifacts, base_path, read


CONVERTERS = ("auto", "native", "upstream")


def _use_upstream(model_dir: Path, converter: str) -> bool:
    """auto: llama.cpp's converter only for an architecture with no native class."""
    if converter not in CONVERTERS:
        raise InputError(f"unknown converter {converter!r}", f"use one of: {', '.join(CONVERTERS)}")
    if converter != "auto" or not (model_dir / "config.json").is_file():
        return converter == "upstream"
    from quantkit.checkpoint import read_json
    from quantkit.convert.archs import REGISTRY

    config = read_json(model_dir / "config.json")
    archs = config.get("architectures") if isinstance(config, dict) else None
    if not isinstance(archs, list) or not archs or config.get("auto_map"):
        return False  # the native preflight says what is wrong
    if any(a in REGISTRY for a in archs if isinstance(a, str)):
        return False
    from quantkit.convert.upstream import known_architectures
    from quantkit.errors import QuantkitError

    try:
        return archs[0] in known_architectures()
    except QuantkitError:  # no llama.cpp source in the cache: the native error is the clearer one
        return False


def _open_adapter(adapter: Any, qs: QuantSettings, stack: ExitStack) -> Any:
    """The adapter, open and closed with ``stack``."""
    from quantkit.convert.lora import LoraAdapter

    if qs.calib is not None:
        raise InputError(
            "convert() collects no importance matrix through an adapter (it would see the base, "
            "not the fine-tune)",
            "quantkit.export and `quantkit convert` collect it from a merged copy; or pass --imatrix",
        )
    lora = adapter if isinstance(adapter, LoraAdapter) else LoraAdapter.open(adapter)
    stack.callback(lora.close)
    return lora


def _adapter_warnings(lora: Any, model_dir: Path, config: dict) -> list[str]:
    """A base whose name differs from the one the adapter was trained on is worth a warning
    (not an error: local copies are often renamed); shapes are checked separately."""
    want = lora.base_name.rstrip("/").split("/")[-1]
    have = {model_dir.resolve().name, model_name(model_dir, config)}
    if want and want not in have:
        return [
            f"adapter {lora.path.name} was trained on {lora.base_name!r}, base given is "
            f"{model_dir.resolve().name!r} — check it is the same model"
        ]
    return []


def _check_vllm_lora(lora: Any) -> None:
    from quantkit.convert.lora import AdapterError, vllm_lora_problems

    problems = vllm_lora_problems(lora)
    if problems:
        raise AdapterError(
            f"{lora.path}: {VLLM_LORA_TARGET}: {'; '.join(problems)}",
            "merge instead: convert the base with --adapter DIR to a full model",
        )


def _write_vllm_lora(lora: Any, path: Path, dry_run: bool) -> Artifact:
    from quantkit.atomic import atomic_dir
    from quantkit.convert.lora import write_vllm_lora

    t0 = time.perf_counter()
    n = 2 * len(lora.modules)
    if dry_run:
        return Artifact(
            path, VLLM_LORA_TARGET, sum(t.nbytes for t in lora.tensors.values()), n, 0.0
        )
    with atomic_dir(path) as tmp:
        size = write_vllm_lora(lora, tmp)
    return Artifact(path, VLLM_LORA_TARGET, size, n, time.perf_counter() - t0)


def _check_gguf_lora(lora: Any, arch: Architecture) -> None:
    """What llama.cpp's LoRA loader cannot apply, named at once."""
    from quantkit.convert.lora import AdapterError

    bad = [m.module for m in lora.modules.values() if m.embedding]
    reasons = []
    if bad:
        reasons.append(f"LoRA on embeddings ({', '.join(bad[:3])})")
    if lora.replaced:
        reasons.append(f"fully trained modules ({', '.join(sorted(lora.replaced)[:3])})")
    if lora.fan_in_fan_out:
        reasons.append("fan_in_fan_out (Conv1D) layers")
    if reasons:
        raise AdapterError(
            f"{lora.path}: {LORA_TARGET} cannot carry {'; '.join(reasons)}",
            "merge instead: convert the base with --adapter DIR --to gguf:F16 (or any type)",
        )


def _write_lora(
    lora: Any, arch: Architecture, path: Path, stem: str, force: bool, dry_run: bool
) -> Artifact:
    from quantkit.convert.lora import write_gguf_lora

    t0 = time.perf_counter()
    n = 2 * len(lora.modules)
    if dry_run:
        size = (
            sum(
                lora.tensors[m.a].n_elements + lora.tensors[m.b].n_elements
                for m in lora.modules.values()
            )
            * 4
        )
        return Artifact(path, LORA_TARGET, size, n, 0.0)
    # No llama.cpp load check here, unlike every model file: llama_adapter_lora_init loads an
    # adapter only onto a loaded base (llama-adapter.cpp checks the architecture and each
    # lora_a/lora_b pair against the base tensor's shape), and convert has no GGUF of the
    # unmerged base (the float files of an --adapter run are the merged model); building one
    # costs a whole base conversion. tests/test_lora.py applies these files to a base in llama.cpp.
    with output_dirs([path]), atomic_output(path, force=force) as tmp:
        n = write_gguf_lora(lora, arch, tmp, stem)
        size = tmp.stat().st_size
    return Artifact(path, LORA_TARGET, size, n, time.perf_counter() - t0)


def requantize(
    src: Path,
    outs: _Outputs,
    *,
    force: bool,
    progress: Progress | None,
    quant: QuantSettings,
    dry_run: bool,
) -> ConvertResult:
    """Quantize an existing F32/F16/BF16 GGUF (no HF checkpoint needed) to each type."""
    types, autos, paths, apaths = outs.types, outs.autos, outs.paths, outs.apaths
    from quantkit.quantize.gguf.reader import read_gguf

    t_start = time.perf_counter()
    info = read_gguf(src)
    ftype = file_type_of(info)
    if ftype is None or not ftype.base:
        raise InputError(
            f"{src}: is {ftype.name if ftype else 'of unknown file type'}, not F32/F16/BF16",
            "quantize from a float GGUF (or the HF checkpoint); requantizing loses quality",
        )
    if quant.calib is not None and (types or quant.imatrix_file is None):
        # with gguf:auto alone and --imatrix, --calib is only the text the gains are probed on
        raise InputError(
            "--calib needs the HF checkpoint (the matrix is collected in torch)",
            "compute it with `quantkit imatrix MODEL_DIR`, then pass --imatrix FILE",
        )
    floats = [q.name for q in types if q.base]
    if floats:
        raise InputError(
            f"{src}: {', '.join(floats)} cannot be made from a {ftype.name} GGUF",
            "convert the HF checkpoint for float types; a GGUF input takes quantized targets",
        )
    # the quantized files keep the source's vocabulary and name: what llama.cpp would refuse in
    # them is refused here, before quantizing
    check_gguf_vocab(src, how="convert the HF checkpoint again with --name")
    imatrix = _preflight_imatrix([t for t in types if not t.base], quant, dry_run, autos)
    options = with_imatrix(quant.options, imatrix, quant.imatrix_file)
    if not dry_run:
        for p in [*paths.values(), *apaths.values()]:
            check_writable(p, force=force)
        src_bytes = info.tensor_bytes
        meta = info.size - src_bytes
        ratio = {q.name: q.bpw / (src_bytes * 8 / max(1, info.n_params)) for q in types}
        check_free_space(
            [(paths[q.name], meta + int(src_bytes * min(1.0, ratio[q.name] * QUANT_MIX)))
             for q in types]
        )  # fmt: skip
    timings = {"preflight": time.perf_counter() - t_start}
    artifacts: list[Artifact] = []
    with output_dirs([] if dry_run else [*paths.values(), *apaths.values()]):
        for q in types:
            artifacts.append(
                _quantize_one(src, q, paths[q.name], options, quant, len(info.tensors),
                              force=force, dry_run=dry_run, progress=progress)
            )  # fmt: skip
        for a in autos:
            artifacts.append(
                _auto_one(src, a, apaths[a], options, quant, force=force, dry_run=dry_run,
                          threads=options.threads, progress=progress)
            )  # fmt: skip
    timings["quantize"] = time.perf_counter() - t_start - timings["preflight"]
    arch = str(info.metadata.get("general.architecture", "?"))
    return ConvertResult(outs.in_order(artifacts), arch, [], 0, timings, imatrix)


def _float_audit(art: Artifact, plan: list[PlannedTensor]) -> Audit:
    """The audit of a float file we just wrote, from its plan (no need to read it back: every
    tensor is the base type or F32 by construction, and there are no fallbacks)."""
    types = {pt.name: "F32" if pt.keep_f32 else art.type for pt in plan}
    tensors = [
        {"name": pt.name, "type": types[pt.name], "shape": list(reversed(pt.shape)),
         "bytes": _planned_bytes(pt.shape, types[pt.name])}
        for pt in plan
    ]  # fmt: skip
    hist: dict[str, int] = {}
    for t in tensors:
        hist[t["type"]] = hist.get(t["type"], 0) + 1
    return Audit(
        path=str(art.path),
        file_type=art.type,
        file_size=art.size,
        n_params=sum(int(np.prod(pt.shape, dtype=np.int64)) for pt in plan),
        tensor_bytes=sum(t["bytes"] for t in tensors),
        histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
        tensors=tensors,
        fallback_source="inferred from shapes",  # as audit() says for a float file: none can occur
    )


# K-quant mixes give some tensors a larger type than the main one (Q4_K_M files come out ~8 %
# above Q4_K's 4.5 bits, Q2_K ~15 % above 2.625); predictions allow 25 %.
QUANT_MIX = 1.25


def _vocab_bytes(vocab: Vocab) -> int:
    """Roughly what the tokenizer metadata takes: token texts, scores, types, merges, template."""
    n = sum(len(t.encode("utf-8", "surrogatepass")) + 16 for t in vocab.tokens)
    n += sum(len(m.encode("utf-8", "surrogatepass")) + 8 for m in vocab.merges or [])
    ct = vocab.chat_template
    texts = [ct] if isinstance(ct, str) else [t["template"] for t in ct or []]
    return n + sum(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 64 * 1024


def _float_bytes(plan: list[PlannedTensor], base: str, vocab: Vocab) -> int:
    return _vocab_bytes(vocab) + sum(
        _planned_bytes(pt.shape, "F32" if pt.keep_f32 else base) for pt in plan
    )


def _quant_bytes(plan: list[PlannedTensor], q: GGUFType, vocab: Vocab) -> int:
    total = _vocab_bytes(vocab)
    for pt in plan:
        n = int(np.prod(pt.shape, dtype=np.int64))
        total += n * 4 if pt.keep_f32 else int(min(n * q.bpw * QUANT_MIX, n * 32) / 8)
    return total


def _planned_bytes(shape: tuple[int, ...], type_name: str) -> int:
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    return int(np.prod(shape, dtype=np.int64)) // block * size


def _calib_chunks(
    base: Path, qs: QuantSettings, *, held_out: bool = False
) -> list[list[int]] | None:
    """Calibration chunks (None without text): for the per-kind/per-layer probes, the start of
    the text; ``held_out``: for selecting among candidates, its end, so neither the probes nor
    the importance matrix (also from the start) saw them. A text too short for both gives the
    selection the probes' chunks (the report's ``selection.chunks`` then equals theirs)."""
    if qs.calib is None:
        return None
    from quantkit.quantize.gguf.auto.build import PROBE_CHUNKS
    from quantkit.validate.metrics import make_chunks
    from quantkit.validate.quality import llama_tokens

    text = read_text(qs.calib)
    need = max(50_000, PROBE_CHUNKS * qs.calib_ctx * 8)
    part = text[-need:] if held_out and len(text) >= 2 * need else text[:need]
    tokens, bos = llama_tokens(base, part, n_ctx=qs.calib_ctx)
    return make_chunks(tokens, qs.calib_ctx, PROBE_CHUNKS, bos) or None


def _auto_one(
    base: Path,
    spec: AutoSpec,
    path: Path,
    options: QuantizeOptions,
    qs: QuantSettings,
    *,
    force: bool,
    dry_run: bool,
    threads: int | None,
    progress: Progress | None,
    checkpoint: Checkpoint | None = None,
) -> Artifact:
    """A gguf:auto target: planned (dry run) or written, checked against the plan and audited.
    ``checkpoint``: the HF checkpoint ``base`` holds unchanged (no adapter merged), whose
    decoder gives the sensitivity its Fisher weights."""
    from quantkit.quantize.gguf.auto.build import (
        dry_selection,
        plan_auto,
        select_and_write,
        write_auto,
    )

    t1 = time.perf_counter()
    plan = plan_auto(base, spec, options, probe_chunks=_calib_chunks(base, qs),
                     n_ctx=qs.calib_ctx, threads=threads, progress=progress,
                     checkpoint=checkpoint)  # fmt: skip
    n = len(plan.tensor_bytes)
    held_out = None if dry_run else _calib_chunks(base, qs, held_out=True)
    if held_out is None:
        why = "dry run" if dry_run else "no calibration text (--calib) to measure candidates on"
        plan = dry_selection(base, plan, options, why)
    if dry_run:
        return Artifact(path, spec.name, plan.file_bytes, n, time.perf_counter() - t1,
                        planned=plan.types, auto=plan.to_json())  # fmt: skip
    shipped: list = []

    def write(tmp: Path):
        if held_out is None:
            shipped.append(plan)
            return write_auto(base, plan, tmp, options, progress=progress)
        p, rep = select_and_write(base, plan, tmp, options, held_out, n_ctx=qs.calib_ctx,
                                  threads=threads, progress=progress)  # fmt: skip
        shipped.append(p)
        return rep

    size, aud, rep = write_checked(path, force, write)
    aud.fallbacks = list(rep.fallbacks)  # a plan's types fit their rows; a stock mix's may not
    return Artifact(path, spec.name, size, n, time.perf_counter() - t1, audit=aud,
                    auto=shipped[0].to_json())  # fmt: skip


def _checked(ckpt: Checkpoint, arch: Architecture, source: str) -> tuple[np.ndarray, str]:
    """One checkpoint tensor, checked finite and transformed for llama.cpp, with its dtype."""
    info = ckpt.tensors[source]
    raw = ckpt.raw(source)
    if not _finite(raw, info.dtype):
        raise CheckpointError(
            f"{info.file.name}: tensor {source!r} contains NaN or Inf",
            NAN_HINT,
        )
    return arch.transform_raw(source, raw, info.dtype)


def _stacked(
    ckpt: Checkpoint, arch: Architecture, sources: tuple[str, ...]
) -> tuple[np.ndarray, str, int]:
    """Several same-shaped tensors (one MoE projection of every expert) stacked along a new
    first axis, read one at a time into the stacked array: the stacked tensor is the only
    allocation. Sources of mixed dtypes are widened to F32."""
    dtypes = {ckpt.tensors[s].dtype for s in sources}
    src = dtypes.pop() if len(dtypes) == 1 else "F32"
    out: np.ndarray | None = None
    nbytes = 0
    for i, s in enumerate(sources):
        part, dtype = _checked(ckpt, arch, s)
        if dtype != src:
            part = to_f32(part, dtype)
            if src != "F32":  # a transform changed one expert's dtype: not a layout we stack
                raise CheckpointError(f"tensor {s!r}: {dtype} after transform, {src} expected")
        if out is None:
            out = np.empty((len(sources), *part.shape), dtype=part.dtype)
        out[i] = part
        nbytes += ckpt.tensors[s].nbytes
        del part
        ckpt.release(s)
    assert out is not None
    return out, src, nbytes


def _stream(
    ckpt: Checkpoint,
    arch: Architecture,
    plan: list,
    sinks: list[_Sink],
    progress: Progress | None,
    clamped: dict[str, float] | None = None,
    lora: Any = None,
) -> int:
    """Write every planned tensor into every sink; return the bytes read from the checkpoint.
    With a LoRA adapter, each adapted tensor is merged in float32 before the arch transform."""
    for s in sinks:
        for pt in plan:
            qt, dt = s.storage(pt.keep_f32)
            nbytes = int(np.prod(pt.shape, dtype=np.int64)) * dt.itemsize
            s.writer.add_tensor_info(pt.name, pt.shape, dt, nbytes, raw_dtype=qt)
        s.writer.write_header_to_file()
        s.writer.write_kv_data_to_file()
        s.writer.write_ti_data_to_file()
    read = 0
    for i, pt in enumerate(plan):
        if progress:
            progress("convert", i, len(plan))
        for nxt in plan[i + 1 : i + 2]:  # read ahead: the disk works while this one is cast
            for name in nxt.sources or ([nxt.source] if nxt.source else []):
                ckpt.prefetch(name)
        if pt.sources:
            raw, src, nbytes = _stacked(ckpt, arch, pt.sources)
            read += nbytes
        elif pt.source is None:
            raw, src = arch.extra_tensor(pt.name), "F32"
        else:
            info = ckpt.tensors[pt.source]
            raw, src = ckpt.raw(pt.source), info.dtype
            read += info.nbytes
            if lora is not None:
                raw, src = lora.apply(pt.source, raw, src)
            # checked finite block by block as it is cast (_cast), where it is read anyway
            raw, src = arch.transform_raw(pt.source, raw, src)
        for s in sinks:
            _, dt = s.storage(pt.keep_f32)
            where = f"{ckpt.tensors[pt.source].file.name}: " if pt.source else ""
            blocks = _cast(raw, src, dt, pt.source or pt.name, clamped, where)
            s.writer.write_tensor_blocks(int(raw.size) * dt.itemsize, blocks)
        del raw
        if pt.source is not None:
            ckpt.release(pt.source)
    for s in sinks:
        s.writer.close()
    if progress:
        progress("convert", len(plan), len(plan))
    return read
