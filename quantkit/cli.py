"""The ``quantkit`` command: a thin click layer over the keyword API.

Errors: library code raises ``QuantkitError``; ``main`` prints one line (``quantkit: error: …``)
and exits with the code from ``errors.EXIT_CODES``. ``QUANTKIT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from quantkit import __version__
from quantkit.atomic import cleanup_all
from quantkit.errors import Interrupted, QuantkitError, exit_code_for
from quantkit.table import format_table, human_bytes

EPILOG_CONVERT = """\b
Examples:
  quantkit convert ./my-model --to gguf:F16 -o my-model-F16.gguf
  quantkit convert ./my-model --to gguf:F16 --to gguf:Q8_0 -o out/
  quantkit convert ./my-model --to Q8_0 --force -o out/
"""

EPILOG_INSPECT = """\b
Examples:
  quantkit inspect out/my-model-Q8_0.gguf
  quantkit inspect out/my-model-Q8_0.gguf --json > info.json
"""

EPILOG_DEMO = """\b
Examples:
  quantkit demo                      # SmolLM2-135M-Instruct, the embedded default
  quantkit demo ./my-model -o demo-out/
"""


class _Progress:
    """tqdm bars on stderr keyed by stage; silent when stderr is not a terminal."""

    def __init__(self) -> None:
        self.bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        bar = self.bars.get(stage)
        if bar is None:
            bar = self.bars[stage] = tqdm(
                total=total, desc=stage, unit="tensor", leave=False, disable=None, file=sys.stderr
            )
        bar.n = done
        bar.refresh()
        if done >= total:
            bar.close()


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="quantkit")
def cli() -> None:
    """Export Hugging Face checkpoints as GGUF for llama.cpp, and check them in llama.cpp itself.

    Run `quantkit COMMAND --help` for a command's options and examples.
    """


@cli.command(epilog=EPILOG_CONVERT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="gguf:TYPE",
    help="Output type, repeatable: gguf:F32, gguf:F16, gguf:BF16, gguf:Q8_0 (case-insensitive). "
    "Several types share one read of the checkpoint.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="A .gguf file (one --to) or a directory (default: current directory).",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin checkpoints (loaded with torch.load(weights_only=True)).",
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Quantizer threads.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    model: Path,
    targets: tuple[str, ...],
    output: Path | None,
    force: bool,
    allow_pickle: bool,
    threads: int | None,
    as_json: bool,
) -> None:
    """Convert a local Hugging Face checkpoint (MODEL folder) to GGUF."""
    from quantkit.convert import convert as run_convert

    t0 = time.perf_counter()
    res = run_convert(
        model,
        targets,
        output,
        force=force,
        allow_pickle=allow_pickle,
        threads=threads,
        progress=_Progress(),
    )
    if as_json:
        click.echo(
            json.dumps(
                {
                    "architecture": res.architecture,
                    "artifacts": [
                        {
                            "path": str(a.path),
                            "type": a.type,
                            "size": a.size,
                            "seconds": round(a.seconds, 3),
                        }
                        for a in res.artifacts
                    ],
                    "unused_tensors": res.unused_tensors,
                    "seconds": round(time.perf_counter() - t0, 3),
                },
                indent=2,
            )
        )
        return
    rows = [[a.type, human_bytes(a.size), f"{a.seconds:.1f}s", str(a.path)] for a in res.artifacts]
    click.echo(format_table(["type", "size", "time", "path"], rows))
    if res.unused_tensors:
        click.echo(
            f"note: {len(res.unused_tensors)} checkpoint tensor(s) not needed by llama.cpp: "
            + ", ".join(res.unused_tensors[:5]),
            err=True,
        )


@cli.command(epilog=EPILOG_INSPECT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: first 40).")
def inspect(path: Path, as_json: bool, show_all: bool) -> None:
    """Show a GGUF file's metadata and tensor table, with totals and bits per weight."""
    from quantkit.gguf_file import read_gguf

    info = read_gguf(path)
    if as_json:
        click.echo(json.dumps(info.to_json(), indent=2, default=str))
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
        f"{human_bytes(info.tensor_bytes)} of tensor data, {info.bpw:.2f} bits per weight ({hist})"
    )


@cli.command(epilog=EPILOG_DEMO)
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("quantkit-demo"),
    show_default=True,
    help="Directory for the GGUF files.",
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
def demo(model: Path | None, output: Path, threads: int | None) -> None:
    """Convert a model (default: the embedded SmolLM2-135M-Instruct) to GGUF F16 and Q8_0, load
    both in llama.cpp and print a table."""
    from quantkit.demo import demo_model
    from quantkit.demo_run import run_demo

    if model is None:
        click.echo(
            "quantkit demo: preparing the embedded default model (SmolLM2-135M-Instruct)...",
            err=True,
        )
        model = demo_model()
    output.mkdir(parents=True, exist_ok=True)
    rows, sample = run_demo(model, output, threads=threads, progress=_Progress())
    click.echo(
        format_table(
            ["type", "size", "bits/weight", "load", "ppl", "top-1 vs F16", "gen tok/s", "path"],
            rows,
        )
    )
    click.echo(f"\nQ8_0 greedy continuation: {sample!r}")


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("interrupted by SIGTERM")


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("QUANTKIT_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        cleanup_all()
        click.echo("quantkit: interrupted", err=True)
        sys.exit(130)
    except (QuantkitError, KeyboardInterrupt) as e:
        cleanup_all()
        if debug:
            raise
        msg = str(e) if isinstance(e, QuantkitError) else "interrupted"
        click.echo(f"quantkit: error: {msg}", err=True)
        sys.exit(exit_code_for(e))
    except Exception as e:
        cleanup_all()
        if debug:
            raise
        click.echo(
            f"quantkit: internal error: {type(e).__name__}: {e} — rerun with QUANTKIT_DEBUG=1 for a traceback",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
