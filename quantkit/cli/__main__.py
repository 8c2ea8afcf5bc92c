"""``python -m quantkit.cli``: the ``quantkit`` command."""

from __future__ import annotations

from quantkit.cli.main import main

main()
