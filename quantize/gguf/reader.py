"""A bounded GGUF reader for ``inspect`` and audits.

Every count and length in the header is checked against the bytes that remain in the file before
anything is allocated, so a lying header costs an error message, not memory (GGUF layout from
ggml/docs/gguf.md and gguf-py's constants). Array values are summarised, not materialised, unless
asked for by key.
"""

from __future__ import annotations

import math
import mmap
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from quantkit.errors import GGUFFormatError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
MAX_DIMS = 4  # GGML_MAX_DIMS
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT

VT = gguf.GGUFValueType
# scalar value type -> struct format (little-endian)
SCALARS: dict[int, str] = {
    VT.UINT8: "<B",
    VT.INT8: "<b",
    VT.UINT16: "<H",
    VT.INT16: "<h",
    VT.UINT32: "<I",
    VT.INT32: "<i",
    VT.FLOAT32: "<f",
    VT.BOOL: "<?",
    VT.UINT64: "<Q",
    VT.INT64: "<q",
    VT.FLOAT64: "<d",
}


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    type: str  # ggml type name, e.g. Q4_K
    shape: tuple[int, ...]  # ggml order (ne0 = row length first)
    offset: int  # absolute offset in the file
    nbytes: int

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass
class GGUFInfo:
    path: Path
    version: int
    size: int
    metadata: dict[str, Any]
    tensors: list[GGUFTensor]
    alignment: int
    arrays: dict[str, tuple[str, int]] = field(default_factory=dict)  # key -> (item type, count)

    @property
    def n_params(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bpw(self) -> float:
        n = self.n_params
        return self.tensor_bytes * 8 / n if n else 0.0

    def type_histogram(self) -> dict[str, int]:
        return dict(Counter(t.type for t in self.tensors).most_common())

    def to_json(self) -> dict[str, Any]:
        meta = {}
        for k, v in self.metadata.items():
            meta[k] = v
        for k, (ty, n) in self.arrays.items():
            meta[k] = {"array": ty, "count": n}
        return {
            "path": str(self.path),
            "gguf_version": self.version,
            "file_size": self.size,
            "alignment": self.alignment,
            "metadata": meta,
            "tensors": [
                {"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.nbytes}
                for t in self.tensors
            ],
            "n_tensors": len(self.tensors),
            "n_params": self.n_params,
            "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": round(self.bpw, 4),
            "type_histogram": self.type_histogram(),
        }


class _Cursor:
    def __init__(self, buf: mmap.mmap | bytes, path: Path) -> None:
        self.buf, self.pos, self.end, self.path = buf, 0, len(buf), path

    def fail(self, what: str) -> GGUFFormatError:
        return GGUFFormatError(f"{self.path}: malformed GGUF: {what} (at byte {self.pos})")

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise self.fail(f"{what} needs {n} bytes, {self.end - self.pos} left")
        b = self.buf[self.pos : self.pos + n]
        self.pos += n
        return b

    def unpack(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"{what} length")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        """Step over ``count`` length-prefixed strings without copying or decoding them (a
        50k-token vocabulary is walked in milliseconds)."""
        buf, pos, end = self.buf, self.pos, self.end
        unpack_from = struct.unpack_from
        for i in range(count):
            if end - pos < 8:
                self.pos = pos
                raise self.fail(f"{what}[{i}] length needs 8 bytes, {end - pos} left")
            (n,) = unpack_from("<Q", buf, pos)
            pos += 8
            if n > end - pos:
                self.pos = pos
                raise self.fail(f"{what}[{i}] needs {n} bytes, {end - pos} left")
            pos += n
        self.pos = pos

    def value(
        self, vtype: int, what: str, *, keep_array: bool
    ) -> tuple[Any, tuple[str, int] | None]:
        if vtype in SCALARS:
            return self.unpack(SCALARS[vtype], what), None
        if vtype == VT.STRING:
            return self.string(what), None
        if vtype == VT.ARRAY:
            itype = self.unpack("<I", f"{what} item type")
            count = self.unpack("<Q", f"{what} count")
            if itype == VT.ARRAY:
                raise self.fail(f"{what}: nested arrays are not supported")
            if itype not in SCALARS and itype != VT.STRING:
                raise self.fail(f"{what}: unknown array item type {itype}")
            # each item needs at least one byte (a string at least its 8-byte length)
            min_item = 8 if itype == VT.STRING else struct.calcsize(SCALARS[itype])
            if count > (self.end - self.pos) // min_item:
                raise self.fail(f"{what}: array of {count} items cannot fit in the file")
            tname = VT(itype).name
            if itype == VT.STRING and not keep_array:
                self.skip_strings(count, what)
                items = []
            elif itype == VT.STRING:
                items = [self.string(f"{what}[{i}]") for i in range(count)]
            else:
                fmt = SCALARS[itype]
                size = struct.calcsize(fmt)
                raw = self.take(size * count, what)
                items = list(struct.unpack(f"<{count}{fmt[1]}", raw)) if keep_array else []
            return (items if keep_array else None), (tname, count)
        raise self.fail(f"{what}: unknown value type {vtype}")


def read_gguf(path: str | Path, *, keep_arrays: tuple[str, ...] = ()) -> GGUFInfo:
    """Parse and check a GGUF header; array values are kept only for the keys named."""
    p = Path(path)
    try:
        size = p.stat().st_size
        if not p.is_file():
            raise GGUFFormatError(f"{p}: not a file")
        with open(p, "rb") as f:
            if size == 0:
                raise GGUFFormatError(f"{p}: empty file, not a GGUF")
            buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    except FileNotFoundError:
        raise GGUFFormatError(f"{p}: no such file") from None
    except OSError as e:
        raise GGUFFormatError(f"{p}: cannot read ({e.strerror})") from None
    try:
        return _parse(_Cursor(buf, p), size, keep_arrays)
    finally:
        buf.close()


def _parse(c: _Cursor, size: int, keep_arrays: tuple[str, ...]) -> GGUFInfo:
    if c.take(min(4, c.end), "magic") != GGUF_MAGIC:
        raise GGUFFormatError(f"{c.path}: not a GGUF file (bad magic)")
    version = c.unpack("<I", "version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFFormatError(f"{c.path}: unsupported GGUF version {version}")
    n_tensors = c.unpack("<Q", "tensor count")
    n_kv = c.unpack("<Q", "metadata count")
    # smallest possible entries: kv = key len (8) + 1 byte key + type (4) + 1 byte value;
    # tensor info = name len (8) + n_dims (4) + 1 dim (8) + type (4) + offset (8)
    if n_kv > (c.end - c.pos) // 14:
        raise c.fail(f"metadata count {n_kv} cannot fit in the file")
    if n_tensors > (c.end - c.pos) // 32:
        raise c.fail(f"tensor count {n_tensors} cannot fit in the file")

    meta: dict[str, Any] = {}
    arrays: dict[str, tuple[str, int]] = {}
    for i in range(n_kv):
        key = c.string(f"metadata key #{i}")
        if key in meta or key in arrays:
            raise c.fail(f"metadata key {key!r} repeated")
        vtype = c.unpack("<I", f"type of {key}")
        val, arr = c.value(vtype, key, keep_array=key in keep_arrays)
        if arr is not None:
            arrays[key] = arr
            if key in keep_arrays:
                meta[key] = val
        else:
            meta[key] = val

    alignment = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise c.fail(f"general.alignment {alignment!r} is not a power of two")

    raw_infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = c.string(f"tensor #{i} name")
        if name in names:
            raise c.fail(f"tensor {name!r} repeated")
        names.add(name)
        n_dims = c.unpack("<I", f"{name} n_dims")
        if not 1 <= n_dims <= MAX_DIMS:
            raise c.fail(f"tensor {name!r} has {n_dims} dimensions (1..{MAX_DIMS} allowed)")
        dims = tuple(c.unpack("<Q", f"{name} dim") for _ in range(n_dims))
        ttype = c.unpack("<I", f"{name} type")
        offset = c.unpack("<Q", f"{name} offset")
        raw_infos.append((name, dims, ttype, offset))

    data_start = -(-c.pos // alignment) * alignment
    tensors: list[GGUFTensor] = []
    for name, dims, ttype, offset in raw_infos:
        tname, block, tsize = _tensor_type(c, name, ttype)
        if dims[0] % block:
            raise GGUFFormatError(
                f"{c.path}: tensor {name!r} row of {dims[0]} is not a multiple of {tname}'s block of {block}"
            )
        n = 1
        for d in dims:
            n *= d
        nbytes = n // block * tsize
        if offset % alignment:
            raise GGUFFormatError(
                f"{c.path}: tensor {name!r} offset {offset} is not {alignment}-aligned"
            )
        if data_start + offset + nbytes > size:
            raise GGUFFormatError(
                f"{c.path}: tensor {name!r} data ({nbytes} bytes at {data_start + offset}) runs past the end of the file ({size} bytes)",
                "the file is truncated",
            )
        tensors.append(GGUFTensor(name, tname, dims, data_start + offset, nbytes))
    return GGUFInfo(c.path, version, size, meta, tensors, alignment, arrays)


def _tensor_type(c: _Cursor, name: str, ttype: int) -> tuple[str, int, int]:
    """(name, block size, block bytes) of a ggml type id: gguf-py's table, else libggml's (a type
    llama.cpp added after the gguf package, e.g. Q2_0, is named by llama.cpp's own name)."""
    try:
        qt = gguf.GGMLQuantizationType(ttype)
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        return qt.name, block, tsize
    except (ValueError, KeyError):
        pass
    from quantkit.quantize.gguf import ggml

    if not ggml.known(ttype):
        raise GGUFFormatError(f"{c.path}: tensor {name!r} has unknown type {ttype}")
    return ggml.type_name(ttype), ggml.block_size(ttype), ggml.block_bytes(ttype)
