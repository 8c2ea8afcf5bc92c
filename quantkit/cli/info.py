"""``quantkit types``, ``archs`` and ``inspect``: what quantkit writes and what a file holds."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from quantkit.table import format_table, human_bytes

if TYPE_CHECKING:
    from quantkit.quantize.gguf.types import GGUFType

EPILOG_INSPECT = """\b
Examples:
  quantkit inspect out/my-model-Q8_0.gguf
  quantkit inspect out/my-model-Q8_0.gguf --json > info.json
"""


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def types(as_json: bool) -> None:
    """List the GGUF types quantkit writes, with nominal bits per weight."""
    from quantkit.quantize.gguf.types import GGUF_TYPES

    rows = [
        {
            "type": t.name,
            "main_tensor_type": t.main,
            "bits_per_weight": t.bpw,
            "needs_imatrix": t.imatrix,
            "made_by": "converter" if t.base else "llama.cpp quantizer",
            "note": _type_note(t),
        }
        for t in GGUF_TYPES.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        format_table(
            ["type", "main tensor type", "bits/weight", "importance matrix", "made by", "note"],
            [
                [
                    r["type"],
                    r["main_tensor_type"],
                    f"{r['bits_per_weight']:.4g}",
                    "required"
                    if r["needs_imatrix"]
                    else "optional"
                    if r["made_by"] != "converter"
                    else "-",
                    r["made_by"],
                    r["note"],
                ]
                for r in rows
            ],
        )
    )
    click.echo(
        "\nbits/weight is the main type's; K-quant mixes put some tensors in larger types."
        "\nbinary/ternary types (TQ*, Q2_0, Q1_0) are for models trained for them: a float model"
        " loses most of its quality there (quantkit warns; docs/formats.md has the KLD)."
    )


def _type_note(t: GGUFType) -> str:
    if t.trained_levels:
        return f"models trained {'binary' if t.trained_levels == 2 else 'ternary'} only"
    if t.experts_only:
        return f"{t.main} for MoE experts, Q8_0 elsewhere"
    if t.via:
        return f"{t.main} per layer weight, {t.via} embeddings/output"
    return ""


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def archs(as_json: bool) -> None:
    """List the architectures that convert: quantkit's native classes, then those llama.cpp's
    own converter (of the engine's version) knows, used as the fallback."""
    import gguf

    from quantkit.convert.archs import REGISTRY
    from quantkit.convert.upstream import engine_version, known_architectures

    version = engine_version()
    upstream = set(known_architectures())
    rows = [
        {"architecture": name, "converter": "native",
         "gguf_arch": gguf.MODEL_ARCH_NAMES[cls.gguf_arch], "upstream_knows": name in upstream}
        for name, cls in sorted(REGISTRY.items())
    ]  # fmt: skip
    rows += [
        {"architecture": name, "converter": "upstream", "gguf_arch": None, "upstream_knows": True}
        for name in sorted(upstream - set(REGISTRY))
    ]
    if as_json:
        click.echo(json.dumps({"llama_cpp_python": version, "architectures": rows}, indent=2))
        return
    click.echo(
        format_table(
            ["architecture", "converter", "gguf arch"],
            [
                [r["architecture"], r["converter"] if r["converter"] == "native" else
                 "llama.cpp (fallback)", r["gguf_arch"] or ""]
                for r in rows
            ],
        )
    )  # fmt: skip
    n_native = sum(r["converter"] == "native" for r in rows)
    click.echo(
        f"\n{n_native} native, {len(rows) - n_native} through llama.cpp's convert_hf_to_gguf.py "
        f"(llama-cpp-python {version}); `quantkit convert --converter` chooses."
    )


@click.command(epilog=EPILOG_INSPECT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: first 40).")
def inspect(path: Path, as_json: bool, show_all: bool) -> None:
    """Show a GGUF file's metadata and tensor table, with totals and bits per weight."""
    from quantkit.quantize.gguf.audit import audit
    from quantkit.quantize.gguf.reader import read_gguf

    info = read_gguf(path)
    aud = audit(path, info=info)
    if as_json:
        d = info.to_json()
        d["audit"] = {k: v for k, v in aud.to_json().items() if k != "tensors"}
        click.echo(json.dumps(d, indent=2, default=str))
        return
    meta_rows = []
    for k, v in info.metadata.items():
        s = str(v)
        meta_rows.append([k, s if len(s) <= 70 else s[:67] + "..."])
    for k, (ty, n) in info.arrays.items():
        meta_rows.append([k, f"[{n} × {ty}]"])
    click.echo(f"{path}  (GGUF v{info.version}, {human_bytes(info.size)})\n")
    click.echo(format_table(["key", "value"], meta_rows))
    tensors = info.tensors if show_all else info.tensors[:40]
    click.echo("")
    click.echo(
        format_table(
            ["tensor", "type", "shape", "bytes"],
            [[t.name, t.type, "×".join(map(str, t.shape)), human_bytes(t.nbytes)] for t in tensors],
        )
    )
    if len(tensors) < len(info.tensors):
        click.echo(f"... {len(info.tensors) - len(tensors)} more (--all)")
    hist = ", ".join(f"{k}: {v}" for k, v in info.type_histogram().items())
    click.echo(
        f"\n{len(info.tensors)} tensors, {info.n_params:,} parameters, "
        f"{human_bytes(info.tensor_bytes)} of tensor data, {info.bpw:.2f} bits per weight "
        f"({aud.file_bpw:.2f} for the whole file); types: {hist}"
    )
    if aud.fallbacks:
        click.echo(f"\n{len(aud.fallbacks)} fallback(s) ({aud.fallback_source}):")
        click.echo(
            format_table(
                ["tensor", "wanted", "got", "row", "block"],
                [[f.tensor, f.wanted, f.got, str(f.ncols), str(f.block)] for f in aud.fallbacks],
            )
        )
