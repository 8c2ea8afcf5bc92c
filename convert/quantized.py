"""The quantized GGUF outputs both converters make from a float base (convert/hf_to_gguf.py,
convert/upstream.py): the settings, the importance-matrix preflight, one type through llama.cpp's
quantizer (load-checked and audited before its rename), and the record of each file written."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_output
from quantkit.convert.loadcheck import check_loads
from quantkit.errors import InputError
from quantkit.progress import Progress
from quantkit.quantize.gguf.audit import Audit, audit
from quantkit.quantize.gguf.auto.spec import AutoSpec
from quantkit.quantize.gguf.quantizer import Fallback, QuantizeOptions, quantize_file
from quantkit.quantize.gguf.types import GGUFType
from quantkit.targets import IMATRIX_CTX


@dataclass
class Artifact:
    path: Path
    type: str
    size: int  # bytes on disk (dry run: predicted)
    n_tensors: int
    seconds: float
    audit: Audit | None = None
    planned: dict[str, str] | None = None  # dry run: tensor -> type
    fallbacks: list[Fallback] = field(default_factory=list)  # dry run: llama.cpp's plan
    auto: dict[str, Any] | None = None  # gguf:auto: the plan (predicted size, KLD, types)

    def to_json(self) -> dict:
        d = {
            "path": str(self.path),
            "type": self.type,
            "size": self.size,
            "seconds": round(self.seconds, 3),
        }
        if self.audit is not None:
            d["audit"] = {k: v for k, v in self.audit.to_json().items() if k != "tensors"}
        if self.planned is not None:
            d["planned"] = self.planned
            d["fallbacks"] = [asdict(f) for f in self.fallbacks]
        if self.auto is not None:
            d["auto"] = self.auto
        return d


@dataclass
class QuantSettings:
    """How quantized targets are made (all optional)."""

    options: QuantizeOptions = field(default_factory=QuantizeOptions)
    imatrix_file: Path | None = None  # reuse a saved importance matrix
    calib: Path | None = None  # calibration text: compute the importance matrix on the way
    calib_ctx: int = IMATRIX_CTX
    calib_chunks: int | None = None
    no_fallback: bool = False  # a tensor that cannot get its type is an error


def preflight_imatrix(
    quants: list[GGUFType], qs: QuantSettings, dry_run: bool, autos: Sequence[AutoSpec] = ()
):
    """Load a given importance matrix; refuse types that need one when none will exist."""
    if qs.imatrix_file is not None and qs.calib is not None and (quants or not autos):
        raise InputError(
            "both --imatrix and --calib given", "use one: --imatrix reuses a saved matrix"
        )
    if qs.calib is not None and not qs.calib.is_file():
        raise InputError(f"{qs.calib}: calibration text not found")
    needing = [q.name for q in quants if q.imatrix]
    if needing and qs.imatrix_file is None and qs.calib is None and not dry_run:
        raise InputError(
            f"{', '.join(needing)} need an importance matrix (llama.cpp refuses them without one)",
            "pass --calib TEXT to compute one on the way, or --imatrix FILE to reuse one",
        )
    if autos and qs.imatrix_file is None and qs.calib is None:
        iq = [t for a in autos for t in (a.types or ()) if t.startswith("IQ")]
        raise InputError(
            (f"gguf:auto with {', '.join(iq)} needs an importance matrix" if iq else
             "gguf:auto needs an importance matrix: it weighs each tensor's error by it"),
            "pass --calib TEXT to compute one on the way, or --imatrix FILE to reuse one",
        )  # fmt: skip
    if qs.imatrix_file is not None:
        from quantkit.quantize.gguf.imatrix import load_imatrix

        return load_imatrix(qs.imatrix_file)
    return None


def with_imatrix(options: QuantizeOptions, im: Any, file: Path | None) -> QuantizeOptions:
    """Options carrying an importance matrix and its provenance (recorded in the GGUF)."""
    if im is None:
        return options
    return replace(
        options,
        imatrix=im.to_quantizer(),
        imatrix_file=str(file) if file else None,
        imatrix_dataset=im.dataset or None,
        imatrix_chunks=im.chunks,
    )


def quantize_one(
    base: Path,
    q: GGUFType,
    path: Path,
    options: QuantizeOptions,
    qs: QuantSettings,
    n_tensors: int,
    *,
    force: bool,
    dry_run: bool,
    progress: Progress | None,
) -> Artifact:
    """One quantized type from a float base: planned (dry run) or written and audited."""
    t1 = time.perf_counter()
    if dry_run or qs.no_fallback:
        rep = quantize_file(base, None, q, options, dry_run=True, progress=progress)
        if qs.no_fallback and rep.fallbacks:
            raise FallbackError(q.name, rep.fallbacks)
        if dry_run:
            return Artifact(path, q.name, rep.predicted_bytes or 0, n_tensors, 0.0,
                            planned=rep.planned, fallbacks=rep.fallbacks)  # fmt: skip
    size, aud, _ = write_checked(
        path, force, lambda tmp: quantize_file(base, tmp, q, options, progress=progress)
    )
    return Artifact(path, q.name, size, n_tensors, time.perf_counter() - t1, audit=aud)


def write_checked(path: Path, force: bool, write: Callable[[Path], Any]) -> tuple[int, Audit, Any]:
    """A quantized file written to a temporary (``write(tmp)`` returns llama.cpp's report),
    loaded by llama.cpp and audited before it is renamed to ``path``: (size, audit, report)."""
    with atomic_output(path, force=force) as tmp:
        rep = write(tmp)
        check_loads(tmp, path.name)
        size = tmp.stat().st_size
        aud = audit(tmp, rep)
    aud.path = str(path)
    return size, aud, rep


class FallbackError(InputError):
    def __init__(self, qtype: str, fallbacks: list[Fallback]) -> None:
        shown = ", ".join(
            f"{f.tensor} {f.wanted}→{f.got} ({f.ncols} cols, block {f.block})"
            for f in fallbacks[:4]
        )
        more = f" and {len(fallbacks) - 4} more" if len(fallbacks) > 4 else ""
        super().__init__(
            f"{qtype}: {len(fallbacks)} tensor(s) cannot get their type: {shown}{more}",
            "drop --no-fallback to accept llama.cpp's fallbacks, or pick a type with 32-wide blocks (Q4_0, Q5_0, Q8_0, IQ4_NL)",
        )
