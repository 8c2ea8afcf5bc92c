"""``quantkit recipes …``, ``quantkit run RECIPE`` and ``quantkit report merge`` (quantkit/pipeline/)."""

from __future__ import annotations

from pathlib import Path

import click

from quantkit.table import format_table

EPILOG_RECIPES = """\b
Examples:
  quantkit recipes list
  quantkit recipes show laptop
  quantkit recipes validate my-release.yaml
"""

EPILOG_RUN = """\b
Examples:
  quantkit run laptop --plan          # what would be built, reused, validated
  quantkit run recipes/release.yaml
  quantkit run release.yaml --only q4km --json
\b
Exit codes: 0 every gate holds, 1 a gate failed, 2 bad recipe or input, 130 interrupted.
"""

EPILOG_REPORT = """\b
Examples:
  quantkit report merge job-q8/ job-q4/ -o release/
"""


@click.group(epilog=EPILOG_RECIPES)
def recipes() -> None:
    """List, show and check recipes: YAML files describing a release (recipes/README.md)."""


@recipes.command("list")
def recipes_list() -> None:
    """The example recipes shipped in recipes/."""
    from quantkit import recipe as rc
    from quantkit.errors import InputError

    rows = []
    for p in rc.shipped():
        try:
            r = rc.load(p)
        except InputError as e:  # e.g. vLLM targets in a build without them: listed, marked
            rows.append([p.stem, "(not runnable here)", e.message.split(": ", 1)[-1]])
            continue
        rows.append([p.stem, ", ".join(t.name for t in r.targets), r.description])
    click.echo(format_table(["recipe", "targets", "description"], rows))


@recipes.command("show")
@click.argument("name")
def recipes_show(name: str) -> None:
    """Print a recipe (a shipped NAME or a FILE)."""
    from quantkit import recipe as rc

    click.echo(rc.find(name).read_text(encoding="utf-8"), nl=False)


@recipes.command("validate")
@click.argument("file")
def recipes_validate(file: str) -> None:
    """Check FILE against the recipe schema; one line naming the offending key, exit 2."""
    from quantkit import recipe as rc

    r = rc.load(rc.find(file))
    click.echo(f"{file}: ok ({len(r.targets)} target(s): {', '.join(t.name for t in r.targets)})")


@click.command(epilog=EPILOG_RUN)
@click.argument("recipe_file", metavar="RECIPE")
@click.option("--plan", "plan_only", is_flag=True, help="Print the steps; build nothing.")
@click.option("--only", multiple=True, metavar="TARGET", help="Only these targets (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan/run record as JSON.")
def run(recipe_file: str, plan_only: bool, only: tuple[str, ...], as_json: bool) -> None:
    """Run RECIPE (a shipped name or a YAML file): convert, quantize, validate, write model
    cards, manifests and reports. Shared intermediates are cached by content hash; a second run
    with nothing changed does no work, and an interrupted run resumes."""
    from quantkit import pipeline
    from quantkit import recipe as rc

    path = rc.find(recipe_file)
    _execute(pipeline.Context(rc.load(path), path), list(only), plan_only, as_json)


def _execute(ctx, only: list[str], plan_only: bool, as_json: bool) -> None:  # noqa: ANN001
    """`run` and `demo`: the plan, or the run with its tables; the exit code from the gates."""
    from quantkit import pipeline
    from quantkit.errors import GateFailed
    from quantkit.progress import ProgressPrinter
    from quantkit.validate.harness import ValidationError
    from quantkit.validate.report import terminal_table

    if plan_only:
        steps = pipeline.plan(ctx, only)
        if as_json:
            click.echo(pipeline.canonical_json([s.__dict__ for s in steps]), nl=False)
        else:
            rows = [[s.kind, s.target or "(shared)", s.action, s.path] for s in steps]
            click.echo(format_table(["step", "target", "action", "path"], rows))
        return
    res = pipeline.run(ctx, only, log=lambda m: click.echo(m, err=True), progress=ProgressPrinter())
    if as_json:
        click.echo(pipeline.canonical_json(res.to_json()), nl=False)
    else:
        rows = []
        for m in res.manifests:
            v = m.get("validation") or {}
            q = v.get("quality") or {}
            gates = (
                "—"
                if not v
                else "n/a (host)"
                if v.get("unsupported_artifacts")
                else "TOO SLOW"
                if v.get("too_slow_artifacts")
                else "pass"
                if v.get("passed")
                else "FAIL"
            )
            rows.append(
                [m.get("target", "?"), m.get("type", "?"), str(m.get("size", "")),
                 "—" if q.get("kld_mean") is None else f"{q['kld_mean']:.4g}", gates]
            )  # fmt: skip
        click.echo(format_table(["target", "type", "bytes", "mean KLD", "gates"], rows))
        if res.report is not None:
            click.echo("\n" + terminal_table(res.report))
        built = sum(s.action == "build" for s in res.steps)
        click.echo(f"\n{built} step(s) built, {len(res.steps) - built} reused; out: {ctx.out}")
        if res.report is not None:
            click.echo(f"report: {ctx.out / 'report.md'}\nchart: {ctx.out / 'report.png'}")
    for u in res.unsupported:  # not a failure: the engine cannot run this format on this host
        click.echo(f"quantkit: note: {u['target']}: built, not scorable on this host", err=True)
    if res.failed_artifacts:
        raise ValidationError(
            f"could not be scored: {', '.join(res.failed_artifacts)}",
            "see NAME/report.md for the engine's log tail; the next run retries it",
        )
    if res.failed_gates or res.too_slow:
        raise GateFailed(
            "; ".join(
                [
                    f"gate failed: {g['target']} --{g['gate']} {g['threshold']:g} "
                    f"(measured {g['value']})"
                    for g in res.failed_gates
                ]
                + [f"{u['target']}: {u['error']}" for u in res.too_slow]
            ),
            "raise validation.max_minutes, or validate on a faster host" if res.too_slow else None,
        )


EPILOG_DEMO = """\b
Examples:
  quantkit demo                      # SmolLM2-135M-Instruct, the embedded default
  quantkit demo --plan               # what it will build, reuse and validate
  quantkit demo ./my-model -o demo-out/
  quantkit demo --only q8 --only fp8
\b
It runs the shipped recipe `demo` (recipes/demo.yaml; `quantkit recipes show demo`), like
`quantkit run demo`: GGUF Q8_0, Q4_K_M and IQ4_XS (importance matrix) scored in llama.cpp,
FP8 and W4A16 checkpoints scored in vLLM. A second run reuses everything it built.
\b
Exit codes: 0 every gate holds (a W4A16 row that vLLM cannot run on this CPU is shown as
"not scorable on this host" and does not fail the demo), 1 a gate failed, 2 bad input or an
artifact could not be scored.
"""


@click.command(epilog=EPILOG_DEMO)
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=Path("quantkit-demo"),
    show_default=True,
    help="Output folder (artifacts, model cards, report.md/.json/.png).",
)
@click.option("--plan", "plan_only", is_flag=True, help="Print the steps; build nothing.")
@click.option("--only", multiple=True, metavar="TARGET", help="Only these targets (repeatable).")
@click.option("--json", "as_json", is_flag=True, help="Print the plan/run record as JSON.")
def demo(
    model: Path | None, output: Path, plan_only: bool, only: tuple[str, ...], as_json: bool
) -> None:
    """Quantize a model (default: the embedded SmolLM2-135M-Instruct) for llama.cpp and vLLM,
    validate every artifact in its engine, and print the report table and the chart's path."""
    from quantkit import pipeline
    from quantkit import recipe as rc
    from quantkit.errors import InputError

    if model is not None and not (model / "config.json").is_file():
        raise InputError(f"{model}: not a Hugging Face model folder (no config.json)")
    if model is None and not plan_only:
        click.echo(
            "quantkit demo: recipe `demo` on the embedded default model (SmolLM2-135M-Instruct)",
            err=True,
        )
    path = rc.find("demo")
    ctx = pipeline.Context(rc.load(path), path, output=output, model=model)
    _execute(ctx, list(only), plan_only, as_json)


@click.group(epilog=EPILOG_REPORT)
def report() -> None:
    """Work with run outputs (manifests and validation reports)."""


@report.command("merge")
@click.argument("sources", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path))
def report_merge(sources: tuple[Path, ...], output: Path) -> None:
    """Merge the outputs of several `quantkit run --only` jobs into one manifest.json and
    report.json/.md; byte-identical whatever the order of SOURCES."""
    from quantkit import pipeline

    merged = pipeline.merge(list(sources), output)
    n = len(merged.get("artifacts", []))
    click.echo(f"merged {n} artifact(s) into {output}")
