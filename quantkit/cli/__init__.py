"""The ``quantkit`` command: a thin click layer over the keyword API, one module per command.

main.py      the group, error → exit code, signals
convert.py   convert (every target kind, through quantkit/pipeline/build.py)
render.py    convert's tables, dry-run plans and notes
validate.py  validate
imatrix.py   imatrix
info.py      types, archs, inspect
engines.py   engines setup / status / check
recipes.py   recipes, run, demo, report merge
"""

from __future__ import annotations

from quantkit.cli.main import cli, main

__all__ = ["cli", "main"]
