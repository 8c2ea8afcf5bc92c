"""What a quantized GGUF really holds: per-tensor types, a histogram, bits per weight, fallbacks.

Fallbacks are tensors that did not get the type llama.cpp wanted for them because their rows do
not split into its blocks (e.g. K-quants need rows that are multiples of 256). Right after a
quantization they come from llama.cpp's own log (exact: wanted and got); for a file alone
(`inspect`) they are inferred from shapes: a weight whose row length is not a multiple of the file
type's main block, stored in another quantized type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.quantize.gguf.quantizer import Fallback, QuantizeReport
from quantkit.quantize.gguf.reader import GGUFInfo, read_gguf
from quantkit.quantize.gguf.types import BY_FTYPE, GGUFType

FLOAT_TYPES = {"F32", "F16", "BF16", "F64"}


@dataclass
class Audit:
    path: str
    file_type: str | None
    file_size: int
    n_params: int
    tensor_bytes: int
    histogram: dict[str, int]
    tensors: list[dict[str, Any]]
    fallbacks: list[Fallback] = field(default_factory=list)
    fallback_source: str = "none"  # "llama.cpp log" | "inferred from shapes"

    @property
    def bpw(self) -> float:
        """Bits per weight of the tensor data (weight bytes × 8 / parameters, as docs/report-schema.md defines it)."""
        return self.tensor_bytes * 8 / self.n_params if self.n_params else 0.0

    @property
    def file_bpw(self) -> float:
        """Bits per weight of the whole file, header and vocabulary included."""
        return self.file_size * 8 / self.n_params if self.n_params else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "file_type": self.file_type,
            "file_size": self.file_size,
            "n_params": self.n_params,
            "tensor_bytes": self.tensor_bytes,
            "bits_per_weight": round(self.bpw, 4),
            "file_bits_per_weight": round(self.file_bpw, 4),
            "type_histogram": self.histogram,
            "fallbacks": [asdict(f) for f in self.fallbacks],
            "fallback_source": self.fallback_source,
            "tensors": self.tensors,
        }


def file_type_of(info: GGUFInfo) -> GGUFType | None:
    ft = info.metadata.get("general.file_type")
    return BY_FTYPE.get(int(ft)) if isinstance(ft, int) else None


def infer_fallbacks(info: GGUFInfo, qtype: GGUFType) -> list[Fallback]:
    if qtype.base:
        return []
    block = qtype.block
    out = []
    for t in info.tensors:
        if len(t.shape) < 2 or t.type in FLOAT_TYPES or t.type == qtype.main:
            continue
        if t.shape[0] % block:
            out.append(Fallback(t.name, qtype.main, t.type, t.shape[0], block))
    return out


def audit(
    path: str | Path, report: QuantizeReport | None = None, info: GGUFInfo | None = None
) -> Audit:
    info = info or read_gguf(path)
    qtype = file_type_of(info)
    if report is not None:
        actual = {t.name: t.type for t in info.tensors}
        # the file has the last word on what each tensor got
        fallbacks = [
            Fallback(f.tensor, f.wanted, actual.get(f.tensor, f.got), f.ncols, f.block)
            for f in report.fallbacks
        ]
        # llama.cpp demotes the output / tied embedding tensor without logging it as a fallback
        # (llama-quant.cpp: "if (nx % qk_k != 0) new_type = GGML_TYPE_Q8_0"); shapes catch those
        logged = {f.tensor for f in fallbacks}
        if qtype is not None:
            fallbacks += [f for f in infer_fallbacks(info, qtype) if f.tensor not in logged]
        source = "llama.cpp log"
    elif qtype is not None:
        fallbacks, source = infer_fallbacks(info, qtype), "inferred from shapes"
    else:
        fallbacks, source = [], "none"
    return Audit(
        path=str(info.path),
        file_type=qtype.name if qtype else None,
        file_size=info.size,
        n_params=info.n_params,
        tensor_bytes=info.tensor_bytes,
        histogram=info.type_histogram(),
        tensors=[
            {"name": t.name, "type": t.type, "shape": list(t.shape), "bytes": t.nbytes}
            for t in info.tensors
        ],
        fallbacks=fallbacks,
        fallback_source=source,
    )
