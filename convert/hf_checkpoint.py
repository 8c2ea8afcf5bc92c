"""``--to hf[:bf16|fp16|f32]``: a plain Hugging Face checkpoint folder that transformers and vLLM
load, written tensor by tensor.

The weights stream from the checkpoint reader's memory map straight into safetensors shards:
each tensor is read, merged with the LoRA adapter when one is given (``LoraAdapter.apply``, the
merge the GGUF path uses), cast in slices and written before the next is read, so peak memory is
bounded by the largest tensor (by its float32 copy when it is merged), never by the model. The
output keeps the input's tensor names; config.json (dtype, and the vocabulary size of a fine-tune
that resized its embeddings), generation_config.json and the tokenizer files (the adapter's when
it carries one) go beside the shards. The folder appears under its final name only when complete.

The safetensors layout written here is the format's own (huggingface/safetensors README
"Format"): an 8-byte little-endian header length, a JSON header of ``dtype`` / ``shape`` /
``data_offsets`` per tensor padded with spaces to a multiple of 8, then the data. Shards and
``model.safetensors.index.json`` follow transformers' ``save_pretrained``:
``model-00001-of-00003.safetensors`` and ``{"metadata": {"total_size": …}, "weight_map": …}``,
with ``{"format": "pt"}`` as each file's metadata (transformers refuses a file without it).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from quantkit.atomic import atomic_output_dir, check_writable_dir, output_dirs
from quantkit.casts import F16_MAX, f32_to_bf16, to_f32
from quantkit.checkpoint import (
    FLOAT_DTYPES,
    MODEL_FILES,
    SAFETENSORS_DTYPES,
    TOKENIZER_DIRS,
    TOKENIZER_FILES,
    Checkpoint,
)
from quantkit.diskspace import check_free_space
from quantkit.errors import CheckpointError, InputError
from quantkit.progress import Progress

if TYPE_CHECKING:
    from quantkit.targets import HFTarget

# HFTarget.dtype (quantkit/targets.py) -> safetensors dtype
DTYPES = {"bf16": "BF16", "f16": "F16", "f32": "F32"}
# safetensors dtype -> config.json "dtype" (transformers' name)
CONFIG_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}
SLICE = 1 << 18  # elements cast per step: the cast's temporaries stay about 3 MB


@dataclass(frozen=True)
class HFArtifact:
    path: Path
    type: str  # "hf-bf16", "hf-f16", "hf-f32", or "hf" (each tensor in its own dtype)
    size: int  # bytes of every file in the folder
    n_tensors: int
    n_shards: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "type": self.type,
            "size": self.size,
            "tensors": self.n_tensors,
            "shards": self.n_shards,
            "seconds": round(self.seconds, 3),
        }


def write_hf_checkpoint(
    model: str | os.PathLike[str] | Checkpoint,
    target: str | HFTarget,
    out: str | os.PathLike[str],
    *,
    adapter: Any = None,
    force: bool = False,
    progress: Progress | None = None,
) -> HFArtifact:
    """Write ``model`` (a checkpoint folder or an open ``Checkpoint``), merged with ``adapter``
    (a PEFT LoRA folder or ``LoraAdapter``) when given, as an HF checkpoint folder.

    ``target``: an ``HFTarget`` (quantkit/targets.py) or its text, ``hf``, ``hf:bf16`` /
    ``hf:fp16`` / ``hf:f32``, optionally with ``shard=SIZE`` (``hf:bf16,shard=2GB``; default
    5 GB per shard). Without a dtype every tensor keeps its stored dtype (a merged one goes back
    to its base tensor's). ``out``: the checkpoint folder itself (``quantkit convert`` and
    ``quantkit.export`` place it: quantkit/pipeline/build.py ``place``).
    """
    from quantkit.convert.lora import LoraAdapter
    from quantkit.targets import HFTarget, parse_target

    t = parse_target(target)
    if not isinstance(t, HFTarget):
        raise InputError(f"{t.label()} is not an hf target")
    t0 = time.perf_counter()
    with ExitStack() as stack:  # what this call opens, it closes, on every path
        ckpt = model if isinstance(model, Checkpoint) else Checkpoint.open(Path(model))  # type: ignore[arg-type]
        if ckpt is not model:
            stack.callback(ckpt.close)
        lora = adapter
        if adapter is not None and not isinstance(adapter, LoraAdapter):
            lora = LoraAdapter.open(adapter)
            stack.callback(lora.close)
        job = _preflight(ckpt, lora, t, Path(out), force=force)
        size = _write(job, force=force, progress=progress)
        n_tensors, n_shards = len(job.plan), len(job.shards)
        return HFArtifact(job.final, job.label, size, n_tensors, n_shards, time.perf_counter() - t0)


@dataclass
class _Job:
    """A write that passed its preflight: what to read, and what to write where."""

    ckpt: Checkpoint
    lora: Any  # the open LoraAdapter, or None
    label: str
    final: Path
    plan: list[Planned]
    shards: list[list[Planned]]
    total: int  # bytes of tensor data
    config: dict[str, Any]  # config.json as written
    tok_dir: Path  # where the tokenizer's files come from


def _preflight(
    ckpt: Checkpoint,
    lora: Any,
    t: HFTarget,
    final: Path,
    *,
    force: bool,
) -> _Job:
    """Nothing is written until all of this holds."""
    dtype, shard_bytes = (DTYPES[t.dtype] if t.dtype else None), t.shard
    config = dict(ckpt.config)
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        raise CheckpointError(
            f"{ckpt.path}: is already quantized ({quant.get('quant_method', '?')})",
            "--to hf writes float checkpoints: give the unquantized model",
        )
    shapes = {n: t.shape for n, t in ckpt.tensors.items()}
    if lora is not None:
        lora.check_base(shapes)
        shapes = lora.shapes(shapes)
        config = lora.merged_config(config)
    label = t.label()
    check_writable_dir(final, force=force)
    plan = _plan(ckpt, shapes, dtype)
    shards = _shard(plan, shard_bytes)
    total = sum(p[2] for p in plan)
    check_free_space([(final, total + 64 * 2**20)])
    if dtype:
        config["dtype"] = CONFIG_DTYPES[dtype]
        if "torch_dtype" in config:  # transformers 4's name for it
            config["torch_dtype"] = CONFIG_DTYPES[dtype]
    tok_dir = lora.path if lora is not None and lora.has_tokenizer else ckpt.path
    return _Job(ckpt, lora, label, final, plan, shards, total, config, tok_dir)


def _write(job: _Job, *, force: bool, progress: Progress | None) -> int:
    """The shards, their index, config.json and the side files, at ``job.final`` only when
    complete; returns the folder's size."""
    with output_dirs([job.final]), atomic_output_dir(job.final, force=force) as tmp:
        tmp.mkdir()
        names = _shard_names(len(job.shards))
        _write_shards(tmp, names, job, progress)
        if len(job.shards) > 1:
            index = {
                "metadata": {"total_size": job.total},
                "weight_map": {t[0]: f for f, s in zip(names, job.shards, strict=True) for t in s},
            }
            _write_json(tmp / "model.safetensors.index.json", index)
        _write_json(tmp / "config.json", job.config)
        # the tokenizer's files come from the adapter when the fine-tune saved its own
        # (added tokens, chat template), as on the GGUF path
        for src, files in ((job.tok_dir, TOKENIZER_FILES), (job.ckpt.path, MODEL_FILES)):
            for fname in files:
                if (src / fname).is_file():
                    shutil.copyfile(src / fname, tmp / fname)
        for dname in TOKENIZER_DIRS:
            if (job.tok_dir / dname).is_dir():
                shutil.copytree(job.tok_dir / dname, tmp / dname)
        return sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())


def _write_shards(tmp: Path, names: list[str], job: _Job, progress: Progress | None) -> None:
    done = 0
    for file, shard in zip(names, job.shards, strict=True):
        with open(tmp / file, "wb") as f:
            _write_header(f, shard)
            for tname, out_dtype, _, _ in shard:
                if progress:
                    progress("convert hf", done, len(job.plan))
                _write_tensor(f, job.ckpt, job.lora, tname, out_dtype)
                done += 1
    if progress:
        progress("convert hf", len(job.plan), len(job.plan))


# (tensor name, output dtype, output bytes, shape)
Planned = tuple[str, str, int, tuple[int, ...]]


def _plan(ckpt: Checkpoint, shapes: dict[str, tuple[int, ...]], dtype: str | None) -> list[Planned]:
    plan: list[Planned] = []
    for tname in ckpt.iter_names():  # the input's order: reads the disk front to back
        src = ckpt.tensors[tname].dtype
        out = dtype if dtype is not None and src in FLOAT_DTYPES else src
        shape = shapes[tname]
        plan.append((tname, out, int(np.prod(shape, dtype=np.int64)) * _itemsize(out), shape))
    return plan


def _itemsize(dtype: str) -> int:
    return SAFETENSORS_DTYPES[dtype][1]


def _shard(plan: list[Planned], limit: int) -> list[list[Planned]]:
    """Greedy, in order, as transformers shards: a new shard when the next tensor would take the
    current one past ``limit`` (a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[Planned]] = [[]]
    size = 0
    for p in plan:
        if shards[-1] and size + p[2] > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p[2]
    return shards


def _shard_names(n: int) -> list[str]:
    if n == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]


def _write_header(f: Any, shard: list[Planned]) -> None:
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    pos = 0
    for tname, dtype, nbytes, shape in shard:
        header[tname] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(len(raw).to_bytes(8, "little"))
    f.write(raw)


def _write_tensor(f: Any, ckpt: Checkpoint, lora: Any, tname: str, out: str) -> None:
    src = ckpt.tensors[tname].dtype
    raw = ckpt.raw(tname)
    if lora is not None and (tname in lora.modules or tname in lora.replaced):
        raw, src = lora.apply(tname, raw, src)  # float32, merged (or the trained copy)
    flat = raw.reshape(-1)
    if src == out:
        f.write(memoryview(np.ascontiguousarray(flat)).cast("B"))
    else:
        for i in range(0, flat.size, SLICE):
            f.write(_cast(flat[i : i + SLICE], src, out, tname, ckpt).tobytes())
    del raw, flat
    ckpt.release(tname)


def _cast(part: np.ndarray, src: str, out: str, tname: str, ckpt: Checkpoint) -> np.ndarray:
    """A slice of a stored tensor (BF16 as uint16) → ``out``'s bytes (BF16 as uint16)."""
    if src not in FLOAT_DTYPES or out not in FLOAT_DTYPES:
        raise CheckpointError(f"tensor {tname!r}: cannot cast {src} to {out}")
    f32 = to_f32(part, src)
    if out == "F32":
        return f32.astype("<f4", copy=False)
    if out == "F64":
        return f32.astype("<f8")
    if out == "F16":
        big = float(np.max(np.abs(f32), initial=0.0))
        if big > F16_MAX:
            raise CheckpointError(
                f"{ckpt.tensors[tname].file.name}: tensor {tname!r} has values up to {big:.4g}, "
                "beyond the F16 range (±65504)",
                "use --to hf:bf16 (or hf:f32)",
            )
        return f32.astype("<f2")
    return f32_to_bf16(f32)


def _write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
