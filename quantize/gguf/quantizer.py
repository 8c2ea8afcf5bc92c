"""GGUF quantization in llama.cpp's own code (``llama_model_quantize`` via llama-cpp-python).

No quantizer is re-implemented here: every quantized type comes out of libllama, the same code as
llama.cpp's ``llama-quantize`` tool (docs/decisions.md, decision 2). This module fills
``llama_model_quantize_params`` (threads, output/embedding types, pure, regex tensor-type
overrides, importance matrix, dry run) and reads llama.cpp's log for per-tensor progress, the
planned types of a dry run, and the fallbacks it chose.
"""

from __future__ import annotations

import ctypes
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from quantkit.errors import EngineError, InputError
from quantkit.quantize.gguf import ggml
from quantkit.quantize.gguf.libllama import (
    clear_log,
    llama_cpp,
    log_listener,
    recent_log,
    signals_deferred,
)
from quantkit.quantize.gguf.types import GGUF_TYPES, GGUFType

GGML_TYPE_COUNT = 43  # ggml.h enum ggml_type of the pinned llama.cpp: "unset" in quantize params
# Every weight of the transformer blocks (llama.cpp names them blk.N.*; it applies an override
# only to the tensors it quantizes, so norms and routers stay as they are).
VIA_PATTERN = r"^blk\."
KV_INT, KV_STR = 0, 3  # enum llama_model_kv_override_type (include/llama.h)

# llama.cpp log lines (src/llama-quant.cpp of the pinned version):
#   "[  12/ 272] blk.0.attn_q.weight   - [  576,   576,     1,     1], type =    f16, "
_TENSOR_LINE = re.compile(r"^\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([^\]]*)\],\s+type\s*=\s*(\S+),")
#   dry run: "size =     0.63 MiB ->     0.18 MiB (q4_K)"
_DRY_SIZE = re.compile(r"size\s*=\s*([\d.]+) MiB(?:\s*->\s*([\d.]+) MiB \((\S+)\))?")
#   tensor_type_fallback: "warning: NAME - ncols N not divisible by K (required for type T) ... -> falling back to U"
_FALLBACK = re.compile(
    r"warning:\s+(\S+)\s+-\s+ncols\s+(\d+)\s+not divisible by\s+(\d+)\s+\(required for type\s+(\S+)\).*?"
    r"falling back to\s+(\S+)"
)
_QUANT_SIZE = re.compile(r"quant size\s*=\s*([\d.]+) MiB \(([\d.]+) BPW\)")


def default_threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


def ggml_type(name: str) -> int:
    """'q6_k' / 'Q6_K' / 'f16' / 'q2_0' → the ggml tensor type id (as libggml numbers it)."""
    return ggml.type_id(name)


def parse_overrides(specs: Sequence[str]) -> list[tuple[str, int]]:
    """``attn_v=q6_k`` / ``blk\\.[0-3]\\.ffn_down=q8_0`` → (regex, type); every bad one listed."""
    out, bad = [], []
    for spec in specs:
        pattern, sep, tname = spec.rpartition("=")
        if not sep or not pattern:
            bad.append(f"{spec!r} is not PATTERN=TYPE")
            continue
        try:
            re.compile(pattern)
        except re.error as e:
            bad.append(f"{pattern!r} is not a valid regex ({e})")
            continue
        try:
            out.append((pattern, ggml_type(tname)))
        except InputError:
            bad.append(f"{tname!r} in {spec!r} is not a ggml tensor type")
    if bad:
        raise InputError(
            "bad --tensor-type: " + "; ".join(bad), "write it as PATTERN=TYPE, e.g. attn_v=q6_k"
        )
    return out


@dataclass
class Fallback:
    tensor: str
    wanted: str
    got: str
    ncols: int
    block: int


@dataclass
class QuantizeReport:
    """What llama.cpp said while quantizing: planned types, fallbacks, predicted size."""

    planned: dict[str, str] = field(default_factory=dict)  # tensor -> type (dry run)
    fallbacks: list[Fallback] = field(default_factory=list)
    predicted_bytes: int | None = None
    predicted_bpw: float | None = None


@dataclass
class QuantizeOptions:
    threads: int | None = None
    output_type: str | None = None  # e.g. "q8_0"; None: llama.cpp's choice for the file type
    embedding_type: str | None = None
    pure: bool = False  # every tensor in the file type's base type, no mixes
    leave_output: bool = False  # keep output.weight in the base precision
    overrides: list[tuple[str, int]] = field(default_factory=list)
    imatrix: dict[str, np.ndarray] | None = None  # GGUF tensor name -> per-column importance
    # provenance llama-quantize records in the file (quantize.imatrix.* keys)
    imatrix_file: str | None = None
    imatrix_dataset: str | None = None
    imatrix_chunks: int = 0


def imatrix_kvs(o: QuantizeOptions) -> list[tuple[str, int, str | int]]:
    """The quantize.imatrix.* metadata llama-quantize writes (tools/quantize/quantize.cpp main)."""
    kvs: list[tuple[str, int, str | int]] = []
    if not o.imatrix:
        return kvs
    if o.imatrix_file:
        kvs.append(("quantize.imatrix.file", KV_STR, o.imatrix_file))
    if o.imatrix_dataset:
        kvs.append(("quantize.imatrix.dataset", KV_STR, o.imatrix_dataset))
    kvs.append(("quantize.imatrix.entries_count", KV_INT, len(o.imatrix)))
    if o.imatrix_chunks > 0:
        kvs.append(("quantize.imatrix.chunks_count", KV_INT, o.imatrix_chunks))
    return kvs


class _LogParser:
    """Turns llama.cpp's log fragments into progress calls and a QuantizeReport."""

    def __init__(
        self, report: QuantizeReport, progress: Callable[[str, int, int], None] | None, stage: str
    ):
        self.report, self.progress, self.stage = report, progress, stage
        self.buf = ""
        self.current: str | None = None

    def __call__(self, fragment: str) -> None:
        m = _TENSOR_LINE.match(fragment)
        if m:
            self.current = m.group(3)
            if self.progress:
                self.progress(self.stage, int(m.group(1)) - 1, int(m.group(2)))
        self.buf += fragment
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            self._line(line)

    def _line(self, line: str) -> None:
        rep = self.report
        if m := _FALLBACK.search(line):
            rep.fallbacks.append(
                Fallback(
                    m.group(1),
                    m.group(4).upper(),
                    m.group(5).upper(),
                    int(m.group(2)),
                    int(m.group(3)),
                )
            )
        elif (m := _TENSOR_LINE.match(line)) and (d := _DRY_SIZE.search(line)):
            rep.planned[m.group(3)] = (d.group(3) or m.group(5)).upper()
        elif m := _QUANT_SIZE.search(line):
            rep.predicted_bytes = int(float(m.group(1)) * 1024 * 1024)
            rep.predicted_bpw = float(m.group(2))


def quantize_file(
    src: Path,
    dst: Path | None,
    qtype: GGUFType,
    options: QuantizeOptions | None = None,
    *,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> QuantizeReport:
    """Quantize the GGUF ``src`` (F32/F16/BF16) into ``dst`` as ``qtype``.

    With ``dry_run`` nothing is written: the report has the planned type of every tensor and the
    predicted size, as llama.cpp computes them.
    """
    o = options or QuantizeOptions()
    lib = llama_cpp()
    params = lib.llama_model_quantize_default_params()
    params.nthread = o.threads or default_threads()
    params.ftype = int(qtype.ftype)
    overrides = list(o.overrides)
    kvs = imatrix_kvs(o)
    if qtype.via:  # a type llama.cpp quantizes per tensor only (types.py GGUFType.via)
        params.ftype = int(GGUF_TYPES[qtype.via].ftype)
        overrides.append((VIA_PATTERN, qtype.main_id))  # after the user's: the first match wins
        kvs.append(("general.file_type", KV_INT, int(qtype.ftype)))
    params.pure = o.pure
    params.dry_run = dry_run
    params.quantize_output_tensor = not o.leave_output
    if o.output_type:
        params.output_tensor_type = int(ggml_type(o.output_type))
    if o.embedding_type:
        params.token_embedding_type = int(ggml_type(o.embedding_type))

    keep: list[object] = []  # ctypes buffers must outlive the call
    if overrides:
        arr = (lib.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, t) in enumerate(overrides):
            b = pattern.encode()
            keep.append(b)
            arr[i].pattern, arr[i].type = b, int(t)
        arr[len(overrides)].pattern, arr[len(overrides)].type = (
            None,
            GGML_TYPE_COUNT,
        )  # terminator
        keep.append(arr)
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_tensor_override))
    if o.imatrix:
        arr = (lib.llama_model_imatrix_data * (len(o.imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(o.imatrix.items())):
            v = np.ascontiguousarray(values, dtype=np.float32)
            b = name.encode()
            keep += [v, b]
            arr[i].name = b
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(o.imatrix)].name, arr[len(o.imatrix)].size = None, 0  # terminator, as quantize.cpp
        keep.append(arr)
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(lib.llama_model_imatrix_data))
    if kvs:
        kv = (lib.llama_model_kv_override * (len(kvs) + 1))()  # zeroed last entry ends the list
        for i, (key, tag, val) in enumerate(kvs):
            kv[i].key, kv[i].tag = key.encode(), tag
            if tag == KV_STR:
                kv[i].value.val_str = str(val).encode("utf-8")[:127]  # strncpy(…, 127) there
            else:
                kv[i].value.val_i64 = int(val)
        keep.append(kv)
        params.kv_overrides = ctypes.cast(kv, ctypes.POINTER(lib.llama_model_kv_override))

    report = QuantizeReport()
    out = str(dst if dst is not None else src.with_name(src.name + ".dry-run")).encode()
    clear_log()
    parser = _LogParser(report, progress, f"{'plan' if dry_run else 'quantize'} {qtype.name}")
    with log_listener(parser), signals_deferred():
        rc = lib.llama_model_quantize(str(src).encode(), out, ctypes.byref(params))
    if rc != 0:
        why = "; ".join(recent_log(3, errors_only=True)) or f"return code {rc}"
        hint = None
        if "imatrix" in why or "importance matrix" in why:
            hint = "pass --calib TEXT to compute an importance matrix, or --imatrix FILE"
        raise EngineError(f"llama.cpp could not quantize {src.name} to {qtype.name}: {why}", hint)
    if progress:
        progress(parser.stage, 1, 1)
    return report
