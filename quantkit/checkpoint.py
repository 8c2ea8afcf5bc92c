"""Reading a Hugging Face checkpoint directory: config, tensor index, and tensors one at a time.

Tensors are read through a memory map of each safetensors file, so a tensor costs its own size
only while it is being converted (docs/decisions.md, decision 4). The safetensors header is parsed and
checked here rather than by the ``safetensors`` package: the package's numpy frontend has no
bfloat16, its torch frontend would pull torch into the conversion path, and every length in a
header must be checked against the file before anything is allocated (a lying header must not
cost memory).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.casts import to_f32
from quantkit.errors import CheckpointError

# safetensors dtype -> (numpy dtype, itemsize). BF16 is read as raw uint16 and widened on demand.
# Names from the safetensors format spec (huggingface/safetensors, README "Format").
SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("<f8", 8),
    "F32": ("<f4", 4),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "I64": ("<i8", 8),
    "I32": ("<i4", 4),
    "I16": ("<i2", 2),
    "I8": ("i1", 1),
    "U8": ("u1", 1),
    "BOOL": ("u1", 1),
    "F8_E4M3": ("u1", 1),
    "F8_E5M2": ("u1", 1),
}
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}
MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit for the JSON header
MAX_JSON_BYTES = 64 * 1024 * 1024  # config/index/tokenizer_config; tokenizer.json may be larger
PICKLE_WEIGHTS = (
    "pytorch_model.bin",
    "model.bin",
    "consolidated.pth",
    "model.pt",
    "pytorch_model.pt",
)

# Files a transformers or vLLM user expects beside a checkpoint's weights: the tokenizer's
# (SentencePiece models keep tokenizer.model), chat template, and the generation defaults.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
# transformers >= 5 saves named chat templates other than "default" as
# additional_chat_templates/<name>.jinja beside chat_template.jinja
TOKENIZER_DIRS: tuple[str, ...] = ("additional_chat_templates",)
MODEL_FILES: tuple[str, ...] = ("generation_config.json",)
SIDE_FILES: tuple[str, ...] = TOKENIZER_FILES + MODEL_FILES


def json_or_none(path: Path) -> Any:
    """A JSON file, or None where it is absent, unreadable or not JSON: for optional files whose
    faults the engine that reads them reports itself."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_json(path: Path, *, what: str | None = None, limit: int = MAX_JSON_BYTES) -> Any:
    """Parse a JSON file with a size bound and duplicate-key check; errors name the file."""
    what = what or path.name
    try:
        size = path.stat().st_size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read {what} ({e.strerror})") from None
    if size > limit:
        raise CheckpointError(f"{path}: {what} is {size} bytes, over the {limit}-byte limit")

    def no_dupes(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    try:
        return json.loads(path.read_bytes(), object_pairs_hook=no_dupes)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: {what} is not valid JSON ({e})") from None
    except RecursionError:  # "[[[[…" deeper than the interpreter's stack
        raise CheckpointError(f"{path}: {what} is nested too deeply to be real JSON") from None


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype name
    shape: tuple[int, ...]
    file: Path
    start: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


def parse_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Validate a safetensors header against its file; return tensor infos and __metadata__."""
    raw, size = _header_bytes(path)
    header, meta = _header_json(path, raw)
    data_start = 8 + len(raw)
    data_len = size - data_start
    infos = {
        name: _tensor_info(path, name, entry, data_start, data_len)
        for name, entry in header.items()
    }
    _check_tiling(path, infos, data_start, data_len)
    return infos, {str(k): str(v) for k, v in meta.items()}


def _header_bytes(path: Path) -> tuple[bytes, int]:
    """The JSON header's bytes (its length bounded, and inside the file) and the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(
                    f"{path}: truncated safetensors file ({size} bytes, no header)"
                )
            (hlen,) = struct.unpack("<Q", head)
            if hlen > MAX_HEADER_BYTES:
                raise CheckpointError(
                    f"{path}: safetensors header length {hlen} is over the 100 MB limit"
                )
            if 8 + hlen > size:
                raise CheckpointError(
                    f"{path}: safetensors header length {hlen} runs past the end of the file ({size} bytes)",
                    "the file is truncated or not a safetensors file",
                )
            return f.read(hlen), size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def _header_json(path: Path, raw: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
    """The header as a JSON object of tensor entries (no name twice) and its __metadata__."""
    dupes: list[str] = []

    def hook(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in pairs:
            if k in out:
                dupes.append(k)
            out[k] = v
        return out

    try:
        header = json.loads(raw, object_pairs_hook=hook)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    except RecursionError:
        raise CheckpointError(f"{path}: safetensors header is nested too deeply") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    if dupes:
        raise CheckpointError(f"{path}: safetensors header repeats tensor {dupes[0]!r}")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: safetensors __metadata__ is not an object")
    return header, meta


def _tensor_info(path: Path, name: str, entry: Any, data_start: int, data_len: int) -> TensorInfo:
    """One tensor entry checked: a known dtype, a sane shape, offsets inside the data whose span
    is exactly shape × dtype size."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r} entry is not an object")
    dtype, shape, offs = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:  # (a list is unhashable)
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not (
        isinstance(shape, list)
        and len(shape) <= 8
        and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offs, list)
        and len(offs) == 2
        and all(isinstance(o, int) and not isinstance(o, bool) for o in offs)
        and 0 <= offs[0] <= offs[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offs!r}")
    # Python ints do not overflow; bound the product by the data size all the same so a
    # shape like [2**40, 2**40] is rejected without arithmetic on absurd numbers.
    n = 1
    for d in shape:
        n *= d
        if n > data_len:
            break
    expect = n * SAFETENSORS_DTYPES[dtype][1]
    if offs[1] > data_len:
        raise CheckpointError(
            f"{path}: tensor {name!r} data ends at byte {offs[1]}, past the end of the data ({data_len} bytes)",
            "the file is truncated",
        )
    if offs[1] - offs[0] != expect:
        raise CheckpointError(
            f"{path}: tensor {name!r} has {offs[1] - offs[0]} bytes but shape {shape} × {dtype} needs {expect}"
        )
    return TensorInfo(name, dtype, tuple(shape), path, data_start + offs[0], expect)


def _check_tiling(path: Path, infos: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """The tensors tile the data exactly: no overlap, no hole, no bytes after the last one."""
    pos = 0
    for t in sorted(infos.values(), key=lambda t: (t.start, t.start + t.nbytes, t.name)):
        b = t.start - data_start
        if b < pos:
            raise CheckpointError(f"{path}: tensor {t.name!r} overlaps the previous tensor's bytes")
        if b > pos:
            raise CheckpointError(f"{path}: hole of {b - pos} bytes before tensor {t.name!r}")
        pos = b + t.nbytes
    if pos != data_len:
        raise CheckpointError(
            f"{path}: {data_len - pos} bytes after the last tensor belong to none"
        )


@dataclass
class Checkpoint:
    """A local HF checkpoint: ``config``, every tensor's ``TensorInfo``, and lazy tensor reads."""

    path: Path
    config: dict[str, Any]
    tensors: dict[str, TensorInfo]
    pickle_files: list[Path] = field(default_factory=list)
    _maps: dict[Path, mmap.mmap] = field(default_factory=dict, repr=False)
    _pickled: dict[str, Any] | None = field(default=None, repr=False)

    @classmethod
    def open(cls, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> Checkpoint:
        root = Path(path)
        if not root.exists():
            raise CheckpointError(f"{root}: no such model directory")
        if not root.is_dir():
            raise CheckpointError(
                f"{root}: not a directory", "give the folder that holds config.json and the weights"
            )
        cfg_path = root / "config.json"
        if not cfg_path.is_file():
            raise CheckpointError(
                f"{root}: no config.json",
                "point at a Hugging Face model folder (config.json + *.safetensors + tokenizer files)",
            )
        config = read_json(cfg_path)
        if not isinstance(config, dict):
            raise CheckpointError(f"{cfg_path}: config.json is not a JSON object")

        files = _weight_files(root)
        if files:
            tensors: dict[str, TensorInfo] = {}
            for f in files:
                infos, _ = parse_safetensors_header(f)
                for name, info in infos.items():
                    if name in tensors:
                        raise CheckpointError(
                            f"{f}: tensor {name!r} is also in {tensors[name].file.name}"
                        )
                    tensors[name] = info
            return cls(root, config, tensors)

        pickles = [p for p in (root / n for n in PICKLE_WEIGHTS) if p.is_file()]
        pickles += sorted(p for p in root.glob("pytorch_model-*.bin") if p not in pickles)
        if not pickles:
            raise CheckpointError(
                f"{root}: no weights (no *.safetensors, no pytorch_model.bin)",
                "the folder needs model.safetensors or sharded safetensors with model.safetensors.index.json",
            )
        if not allow_pickle:
            raise CheckpointError(
                f"{root}: only pickle weights ({pickles[0].name}); refused because unpickling can run code",
                "convert them to safetensors, or pass --allow-pickle to load them with torch.load(weights_only=True)",
            )
        return cls(root, config, {}, pickle_files=pickles)._load_pickles()

    def _load_pickles(self) -> Checkpoint:
        import torch  # only on this explicitly requested path

        merged: dict[str, Any] = {}
        for p in self.pickle_files:
            try:
                sd = torch.load(p, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises UnpicklingError, RuntimeError, ...
                raise CheckpointError(
                    f"{p}: refused by torch.load(weights_only=True): {str(e).splitlines()[0]}"
                ) from None
            if not isinstance(sd, dict):
                raise CheckpointError(f"{p}: does not hold a state dict")
            merged.update(sd)
        self._pickled = merged
        dt = {
            torch.float32: "F32",
            torch.float16: "F16",
            torch.bfloat16: "BF16",
            torch.float64: "F64",
        }
        for name, t in merged.items():
            if not isinstance(t, torch.Tensor):
                continue
            dtype = dt.get(t.dtype)
            if dtype is None:
                raise CheckpointError(
                    f"{self.pickle_files[0]}: tensor {name!r} has dtype {t.dtype}"
                )
            self.tensors[name] = TensorInfo(
                name, dtype, tuple(t.shape), self.pickle_files[0], 0, t.numel() * t.element_size()
            )
        return self

    # -- reading -------------------------------------------------------------------------------
    def _map(self, file: Path) -> mmap.mmap:
        m = self._maps.get(file)
        if m is None:
            with open(file, "rb") as f:
                m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            self._maps[file] = m
        return m

    def raw(self, name: str) -> np.ndarray:
        """The tensor as stored (BF16 as uint16), a zero-copy view of the memory map."""
        info = self.tensors[name]
        if self._pickled is not None:
            import torch

            t = self._pickled[name]
            if t.dtype == torch.bfloat16:
                return t.view(torch.int16).numpy().view(np.uint16)
            return t.numpy()
        np_dtype = SAFETENSORS_DTYPES[info.dtype][0]
        buf = self._map(info.file)
        return np.frombuffer(buf, dtype=np_dtype, count=info.n_elements, offset=info.start).reshape(
            info.shape
        )

    def prefetch(self, name: str) -> None:
        """Ask the kernel to start reading the tensor's bytes into the page cache now
        (MADV_WILLNEED, asynchronous), so a checkpoint not already cached is read from disk
        while the tensor before it is converted, rather than page fault by page fault."""
        info = self.tensors[name]
        if self._pickled is not None or not hasattr(mmap, "MADV_WILLNEED") or not info.nbytes:
            return
        m = self._map(info.file)
        start = info.start // mmap.PAGESIZE * mmap.PAGESIZE
        m.madvise(mmap.MADV_WILLNEED, start, info.start + info.nbytes - start)

    def release(self, name: str) -> None:
        """Drop the tensor's pages from this process's resident set (they stay in the page
        cache). Without this, every page read through the map counts in RSS until the end, and
        peak memory would grow with the model instead of the largest tensor."""
        info = self.tensors[name]
        m = self._maps.get(info.file)
        if m is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        page = mmap.PAGESIZE
        start = info.start // page * page
        end = min(len(m), info.start + info.nbytes)
        if end > start:
            m.madvise(mmap.MADV_DONTNEED, start, end - start)

    def float32(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{info.file}: tensor {name!r} is {info.dtype}, not a float")
        return to_f32(self.raw(name), info.dtype)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a view is still alive; the map closes when it is collected
                pass
        self._maps.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def iter_names(self) -> Iterator[str]:
        # file order, then offset order: reads the disk front to back
        yield from sorted(
            self.tensors, key=lambda n: (str(self.tensors[n].file), self.tensors[n].start)
        )

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    @property
    def source_dtype(self) -> str:
        """The dtype most weight bytes are stored in (F32, F16 or BF16)."""
        by: dict[str, int] = {}
        for t in self.tensors.values():
            if t.dtype in FLOAT_DTYPES and len(t.shape) >= 2:
                by[t.dtype] = by.get(t.dtype, 0) + t.nbytes
        return max(by, key=lambda k: by[k]) if by else "F32"


def _weight_files(root: Path) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        data = read_json(index)
        wm = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
            raise CheckpointError(f"{index}: no 'weight_map' object of tensor → file names")
        files = []
        for name in sorted(set(wm.values())):
            # judged by the name, not by where a link points: in the HF cache every file of a
            # snapshot is a symlink into the repository's blobs/ folder
            p = Path(os.path.normpath(root / name))
            if Path(os.path.normpath(root)) not in p.parents:
                raise CheckpointError(f"{index}: shard {name!r} lies outside the model folder")
            if not p.is_file():
                raise CheckpointError(
                    f"{index}: shard {name!r} is missing",
                    "download or copy every shard the index lists",
                )
            files.append(p)
        return files
    single = root / "model.safetensors"
    if single.is_file():
        return [single]
    return sorted(root.glob("*.safetensors"))
