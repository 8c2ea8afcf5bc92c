"""The ``quantkit`` command: a thin click layer over the keyword API.

Errors: library code raises ``QuantkitError``; ``main`` prints one line (``quantkit: error: …``)
and exits with the code from ``errors.EXIT_CODES``. ``QUANTKIT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import click

from quantkit import __version__
from quantkit.atomic import cleanup_all
from quantkit.errors import Interrupted, QuantkitError, exit_code_for


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="quantkit")
def cli() -> None:
    """Export Hugging Face checkpoints as GGUF for llama.cpp or as FP8/GPTQ/AWQ checkpoints for
    vLLM, and check every artifact in its own engine against the original model.

    Run `quantkit COMMAND --help` for a command's options and examples.
    """


from quantkit.cli.convert import convert  # noqa: E402
from quantkit.cli.engines import engines  # noqa: E402
from quantkit.cli.imatrix import imatrix  # noqa: E402
from quantkit.cli.info import archs, inspect, types  # noqa: E402
from quantkit.cli.recipes import demo, recipes, report, run  # noqa: E402
from quantkit.cli.validate import validate  # noqa: E402

for _cmd in (
    convert,
    types,
    archs,
    imatrix,
    inspect,
    validate,
    engines,
    recipes,
    run,
    report,
    demo,
):
    cli.add_command(_cmd)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("interrupted by SIGTERM")


def _show_library_warnings() -> None:
    """Library code warns through ``logging`` (it never prints); the command shows those
    warnings on stderr as ``quantkit: warning: …``, apart from its one-line errors."""
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("quantkit: warning: %(message)s"))
    handler.setLevel(logging.WARNING)
    logging.getLogger("quantkit").addHandler(handler)


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("QUANTKIT_DEBUG") == "1"
    _show_library_warnings()
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
