"""``quantkit imatrix``: an importance matrix from calibration text, in torch."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.cli import render
from quantkit.progress import ProgressPrinter
from quantkit.text import read_text


@click.command(
    epilog="""\b
Examples:
  quantkit imatrix ./my-model --calib calib.txt -o my-model.imatrix.gguf
  quantkit imatrix ./my-model --calib calib.txt --ctx 512 --chunks 20 -o im.gguf
  quantkit convert ./my-model --to gguf:IQ4_XS --imatrix im.gguf -o out/
"""
)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib", type=click.Path(path_type=Path), required=True, help="Calibration text file."
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="imatrix GGUF to write."
)
@click.option(
    "--ctx",
    type=click.IntRange(min=8),
    default=None,
    help="Tokens per chunk (default 512, llama-imatrix's).",
)
@click.option(
    "--chunks", type=click.IntRange(min=1), default=None, help="Number of chunks (default: all)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def imatrix(
    model: Path,
    calib: Path,
    output: Path,
    ctx: int | None,
    chunks: int | None,
    threads: int | None,
    force: bool,
) -> None:
    """Compute an importance matrix (llama.cpp's imatrix GGUF) from calibration text, in torch."""
    from quantkit.atomic import check_writable
    from quantkit.checkpoint import Checkpoint
    from quantkit.convert.archs import resolve
    from quantkit.errors import InputError
    from quantkit.hub import resolve_model
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.targets import IMATRIX_CTX

    ctx = ctx or IMATRIX_CTX
    check_writable(output, force=force)
    if not calib.is_file():
        raise InputError(f"{calib}: calibration text not found")
    model = resolve_model(model)
    with Checkpoint.open(model) as ck:
        # unsupported architectures fail before the model is loaded
        resolve(ck.config, ck.path / "config.json")
    im = collect_imatrix(
        model,
        read_text(calib),
        ctx=ctx,
        chunks=chunks,
        threads=threads,
        progress=ProgressPrinter(),
    )
    save_imatrix(im, output)
    click.echo(f"wrote {output}: {len(im.entries)} tensors, {im.chunks} chunks of {ctx} tokens")
    render.echo_expert_coverage(im)
