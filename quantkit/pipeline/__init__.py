"""Recipes run as steps with a content-keyed cache (``quantkit run``), and the export dispatch
every entry point shares (``build``).

    build.py    where each output goes, and target kind → builder: GGUF converter,
                llm-compressor, HF checkpoint writer
    export.py   ``quantkit.export``: the Python entry point (a folder, base + adapter, a model
                in memory) to build.py
    context.py  the recipe, its paths and each step's content key
    plan.py     the steps a run will take, each build or reuse
    steps.py    merge, base, imatrix, quantize (through build.py) and validate
    cards.py    each target's model card
    merge.py    several runs' reports and manifests as one
    run.py      the run itself

The names below are imported on first use, so that ``import quantkit.pipeline.build`` (every
``convert``) does not load the recipe machinery (the YAML schema, the run's steps, reports).
"""

from __future__ import annotations

import importlib
from typing import Any

_WHERE = {
    "context": ("Context", "canonical_json"),
    "merge": ("merge",),
    "plan": ("plan",),
    "run": ("RunResult", "run"),
}
_MODULE = {name: mod for mod, names in _WHERE.items() for name in names}
__all__ = sorted(_MODULE)


def __getattr__(name: str) -> Any:
    if name not in _MODULE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # ``run``, ``plan`` and ``merge`` are also submodule names, and importing a submodule binds
    # its name here to the module: every name is bound to its function at once, as an eager
    # import would, whichever is asked first
    for mod, names in _WHERE.items():
        module = importlib.import_module(f"{__name__}.{mod}")
        globals().update({n: getattr(module, n) for n in names})
    return globals()[name]
