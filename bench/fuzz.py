"""Fuzz quantkit's bounded readers: mutated safetensors and GGUF files, for a bounded time.

    python bench/fuzz.py --seconds 300            # both formats, about 5 minutes
    python bench/fuzz.py --seconds 60 --only gguf

Hypothesis draws mutations of small valid files: byte-level ones (bit flips, overwritten bytes,
truncation, insertion, deletion) and structure-aware ones (every length, count, dimension, type
and offset field of the file set to an interesting value: 0, 1, sizes around the file's, 2**31,
2**63, 2**64-1; header JSON values replaced by wrong types, huge or negative numbers, duplicate
keys, a lying header length). Each input goes through what ``quantkit convert`` / ``inspect`` do
with a file: ``parse_safetensors_header`` then every tensor read through the memory map;
``read_gguf`` then ``audit``.

The contract checked: every input either parses or raises quantkit's own error type
(``QuantkitError``); anything else — an IndexError, a MemoryError (the address space is capped
at +2 GiB, so an allocation driven by a lying header shows up as one), an input that takes
longer than --max-call-seconds — is a crash: the input is saved and the script exits 1.
Prints the number of inputs tried.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import struct
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from quantkit.checkpoint import SAFETENSORS_DTYPES, parse_safetensors_header
from quantkit.errors import QuantkitError
from quantkit.quantize.gguf.audit import audit
from quantkit.quantize.gguf.reader import read_gguf

U64_EDGES = [0, 1, 2, 3, 4, 5, 7, 8, 31, 32, 33, 255, 256, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
             2**62, 2**63 - 1, 2**63, 2**64 - 1]  # fmt: skip


# -- seed files ------------------------------------------------------------------------------


def seed_safetensors() -> tuple[bytes, dict, bytes]:
    """A valid safetensors file with several dtypes; returns (file, header, data)."""
    rng = np.random.default_rng(0)
    arrays = {
        "model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32).tobytes(),
        "model.norm.weight": rng.standard_normal(8).astype(np.float16).tobytes(),
        "lm_head.weight": rng.integers(0, 2**16, (4, 8), dtype=np.uint16).tobytes(),
        "model.layers.0.scale": np.int64(7).tobytes(),
    }
    dtypes = {"model.embed_tokens.weight": ("F32", [16, 8]), "model.norm.weight": ("F16", [8]),
              "lm_head.weight": ("BF16", [4, 8]), "model.layers.0.scale": ("I64", [])}  # fmt: skip
    header: dict = {"__metadata__": {"format": "pt"}}
    pos = 0
    for name, raw in arrays.items():
        dt, shape = dtypes[name]
        header[name] = {"dtype": dt, "shape": shape, "data_offsets": [pos, pos + len(raw)]}
        pos += len(raw)
    data = b"".join(arrays.values())
    return st_bytes(header, data), header, data


def st_bytes(header: dict | str, data: bytes, hlen: int | None = None) -> bytes:
    text = header if isinstance(header, str) else json.dumps(header)
    raw = text.encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw) if hlen is None else hlen) + raw + data


class GGUFBuilder:
    """A minimal GGUF v3 writer that records where every length/count/type/offset field is."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.fields: list[tuple[int, int]] = []  # (offset, width in bytes)

    def u32(self, v: int, field: bool = True) -> None:
        if field:
            self.fields.append((len(self.buf), 4))
        self.buf += struct.pack("<I", v)

    def u64(self, v: int, field: bool = True) -> None:
        if field:
            self.fields.append((len(self.buf), 8))
        self.buf += struct.pack("<Q", v)

    def string(self, s: str) -> None:
        b = s.encode()
        self.u64(len(b))
        self.buf += b


def seed_gguf() -> tuple[bytes, list[tuple[int, int]]]:
    import gguf

    b = GGUFBuilder()
    b.buf += b"GGUF"
    b.u32(3)
    tensors = [("token_embd.weight", (32, 4), gguf.GGMLQuantizationType.Q8_0),
               ("output_norm.weight", (8,), gguf.GGMLQuantizationType.F32),
               ("blk.0.attn_q.weight", (8, 2), gguf.GGMLQuantizationType.F16)]  # fmt: skip
    kvs: list[tuple[str, int, object]] = [
        ("general.architecture", gguf.GGUFValueType.STRING, "llama"),
        ("general.file_type", gguf.GGUFValueType.UINT32, 7),
        ("llama.rope.freq_base", gguf.GGUFValueType.FLOAT32, 10000.0),
        ("tokenizer.ggml.tokens", gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.STRING, ["a", "bc", "<s>"])),
        ("tokenizer.ggml.scores", gguf.GGUFValueType.ARRAY, (gguf.GGUFValueType.FLOAT32, [0.0, -1.0, -2.0])),
        ("general.alignment", gguf.GGUFValueType.UINT32, 32),
    ]  # fmt: skip
    b.u64(len(tensors))
    b.u64(len(kvs))
    for key, vt, val in kvs:
        b.string(key)
        b.u32(vt)
        if vt == gguf.GGUFValueType.STRING:
            b.string(str(val))
        elif vt == gguf.GGUFValueType.UINT32:
            b.u32(int(val))  # type: ignore[arg-type]
        elif vt == gguf.GGUFValueType.FLOAT32:
            b.buf += struct.pack("<f", val)
        else:
            itype, items = val  # type: ignore[misc]
            b.u32(itype)
            b.u64(len(items))
            for it in items:
                if itype == gguf.GGUFValueType.STRING:
                    b.string(it)
                else:
                    b.buf += struct.pack("<f", it)
    offset = 0
    sizes = []
    for name, shape, qt in tensors:
        block, tsize = gguf.GGML_QUANT_SIZES[qt]
        n = int(np.prod(shape))
        nbytes = n // block * tsize
        b.string(name)
        b.u32(len(shape))
        for d in shape:
            b.u64(d)
        b.u32(qt)
        b.u64(offset)
        sizes.append(nbytes)
        offset += -(-nbytes // 32) * 32
    b.buf += b"\0" * (-len(b.buf) % 32)
    for n in sizes:
        b.buf += bytes((i * 7) % 251 for i in range(n)) + b"\0" * (-n % 32)
    return bytes(b.buf), b.fields


# -- mutations -------------------------------------------------------------------------------


@st.composite
def byte_mutations(draw: st.DrawFn, seed: bytes) -> bytes:
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        if not data:
            break
        op = draw(st.sampled_from(["flip", "set", "u32", "u64", "truncate", "insert", "delete"]))
        pos = draw(st.integers(0, len(data) - 1))
        if op == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set":
            data[pos] = draw(st.integers(0, 255))
        elif op in ("u32", "u64"):
            w = 4 if op == "u32" else 8
            v = draw(st.sampled_from(U64_EDGES) | st.integers(0, 2**64 - 1)) % (1 << (8 * w))
            data[pos : pos + w] = v.to_bytes(w, "little")
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        else:
            del data[pos : pos + draw(st.integers(1, 64))]
    return bytes(data)


@st.composite
def gguf_field_mutations(draw: st.DrawFn, seed: bytes, fields: list[tuple[int, int]]) -> bytes:
    data = bytearray(seed)
    size = len(seed)
    for _ in range(draw(st.integers(1, 3))):
        pos, w = draw(st.sampled_from(fields))
        v = draw(
            st.sampled_from(U64_EDGES)
            | st.integers(0, 2**64 - 1)
            | st.integers(max(0, size - 64), size + 64)
        ) % (1 << (8 * w))
        data[pos : pos + w] = v.to_bytes(w, "little")
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


JSON_ODD = st.recursive(
    st.none()
    | st.booleans()
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 10**30, -(2**63), 1.5, float("nan")])
    | st.integers()
    | st.text(max_size=8)
    | st.sampled_from(list(SAFETENSORS_DTYPES) + ["F128", "f32", ""]),
    lambda kids: (
        st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=6), kids, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def safetensors_header_mutations(draw: st.DrawFn, header: dict, data: bytes) -> bytes:
    h = json.loads(json.dumps(header))
    names = [k for k in h if k != "__metadata__"]
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["field", "offset", "shape", "drop", "add", "meta"]))
        name = draw(st.sampled_from(names))
        entry = h.get(name)
        if kind == "field" and isinstance(entry, dict):
            entry[draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = draw(JSON_ODD)
        elif kind == "offset" and isinstance(entry, dict):
            i = draw(st.integers(0, 1))
            v = draw(st.sampled_from(U64_EDGES) | st.integers(-(2**64), 2**65))
            if isinstance(entry.get("data_offsets"), list) and len(entry["data_offsets"]) == 2:
                entry["data_offsets"][i] = v
        elif kind == "shape" and isinstance(entry, dict):
            entry["shape"] = draw(
                st.lists(st.sampled_from(U64_EDGES) | st.integers(-2, 40), max_size=9)
            )
        elif kind == "drop":
            h.pop(name, None)
        elif kind == "add":
            h[draw(st.text(max_size=8))] = draw(JSON_ODD)
        else:
            h["__metadata__"] = draw(JSON_ODD)
    text = json.dumps(h, allow_nan=True)
    if draw(st.booleans()) and names:  # a duplicate key, which json.dumps cannot write
        dup = draw(st.sampled_from(names))
        text = text[:-1] + f", {json.dumps(dup)}: {json.dumps(header[dup])}}}"
    body = data
    if draw(st.booleans()):
        body = body[: draw(st.integers(0, len(body)))] + draw(st.binary(max_size=24))
    hlen = None
    if draw(st.integers(0, 4)) == 0:
        hlen = draw(st.sampled_from(U64_EDGES) | st.integers(0, len(text) + 64))
    return st_bytes(text, body, hlen)


# -- targets ---------------------------------------------------------------------------------


def read_safetensors(path: Path) -> None:
    import mmap

    infos, _ = parse_safetensors_header(path)
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if path.stat().st_size else None
        for info in infos.values():  # what Checkpoint.raw does with every tensor
            dt = SAFETENSORS_DTYPES[info.dtype][0]
            arr = np.frombuffer(m, dtype=dt, count=info.n_elements, offset=info.start)  # type: ignore[arg-type]
            with np.errstate(all="ignore"):  # garbage floats may overflow; only reading matters
                arr.reshape(info.shape).sum()
            del arr
        if m is not None:
            m.close()


def read_gguf_file(path: Path) -> None:
    info = read_gguf(path)
    audit(path, info=info)


class Crash(Exception):
    pass


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total fuzzing time")
    ap.add_argument("--only", choices=["safetensors", "gguf"], default=None)
    ap.add_argument("--max-call-seconds", type=float, default=2.0)
    ap.add_argument(
        "--crash-dir", type=Path, default=Path(tempfile.gettempdir()) / "quantkit-fuzz-crashes"
    )
    args = ap.parse_args()

    # cap the address space 2 GiB above what the process maps now: a lying length that reaches
    # an allocation becomes a MemoryError (a crash) instead of swapping the machine
    vm = int(Path("/proc/self/statm").read_text().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    resource.setrlimit(resource.RLIMIT_AS, (vm + (2 << 30), resource.RLIM_INFINITY))

    st_seed, st_header, st_data = seed_safetensors()
    gg_seed, gg_fields = seed_gguf()
    tmpdir = Path(
        tempfile.mkdtemp(
            prefix="quantkit-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
    )
    target_file = tmpdir / "input"
    counts = {"safetensors": 0, "gguf": 0}
    outcomes = {"parsed": 0, "rejected": 0}
    deadline = time.monotonic() + args.seconds

    def run_one(kind: str, blob: bytes) -> None:
        if time.monotonic() > deadline:
            return
        target_file.write_bytes(blob)
        counts[kind] += 1
        t0 = time.monotonic()
        try:
            (read_safetensors if kind == "safetensors" else read_gguf_file)(target_file)
            outcomes["parsed"] += 1
        except QuantkitError as e:
            if "\n" in str(e):
                raise Crash(f"multi-line error message: {e!r}") from None
            outcomes["rejected"] += 1
        except Exception as e:
            path = args.crash_dir / f"{kind}-{counts[kind]}.bin"
            args.crash_dir.mkdir(parents=True, exist_ok=True)
            path.write_bytes(blob)
            raise Crash(f"{kind}: {type(e).__name__}: {e} (input saved to {path})\n"
                        + traceback.format_exc()) from None  # fmt: skip
        dt = time.monotonic() - t0
        if dt > args.max_call_seconds:
            raise Crash(f"{kind}: one input took {dt:.1f} s")

    cfg = settings(
        max_examples=400,
        deadline=None,
        database=None,
        phases=[Phase.generate],  # no shrinking: a crashing input is saved as it is
        suppress_health_check=list(HealthCheck),
    )
    st_inputs = byte_mutations(st_seed) | safetensors_header_mutations(st_header, st_data)
    gg_inputs = byte_mutations(gg_seed) | gguf_field_mutations(gg_seed, gg_fields)

    @cfg
    @given(blob=st_inputs)
    def fuzz_safetensors(blob: bytes) -> None:
        run_one("safetensors", blob)

    @cfg
    @given(blob=gg_inputs)
    def fuzz_gguf(blob: bytes) -> None:
        run_one("gguf", blob)

    # the seeds themselves must parse, or the mutations test nothing
    run_one("safetensors", st_seed)
    run_one("gguf", gg_seed)
    assert outcomes["parsed"] == 2, "the seed files do not parse"
    t0 = time.monotonic()
    targets = [f for k, f in (("safetensors", fuzz_safetensors), ("gguf", fuzz_gguf))
               if args.only in (None, k)]  # fmt: skip
    try:
        while time.monotonic() < deadline:
            for f in targets:
                f()
    except Crash as e:
        print(f"fuzz: CRASH after {sum(counts.values())} inputs: {e}", file=sys.stderr)
        return 1
    finally:
        for p in tmpdir.iterdir():
            p.unlink()
        tmpdir.rmdir()
    total = sum(counts.values())
    print(
        f"fuzz: {total} inputs in {time.monotonic() - t0:.0f} s "
        f"(safetensors {counts['safetensors']}, gguf {counts['gguf']}; "
        f"{outcomes['parsed']} parsed, {outcomes['rejected']} rejected with quantkit's error), "
        "0 crashes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
