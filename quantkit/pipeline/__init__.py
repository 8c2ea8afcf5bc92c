"""Recipes run as steps with a content-keyed cache (``quantkit run``), and the export dispatch
every entry point shares (``build``).

    context.py  the recipe, its paths and each step's content key
    plan.py     the steps a run will take, each build or reuse
    steps.py    merge, base, imatrix, quantize (through build.py) and validate
    build.py    target kind → builder: GGUF converter, llm-compressor, HF checkpoint writer
    cards.py    each target's model card
    merge.py    several runs' reports and manifests as one
    run.py      the run itself
"""

from __future__ import annotations

from quantkit.pipeline.context import Context, canonical_json
from quantkit.pipeline.merge import merge
from quantkit.pipeline.plan import plan
from quantkit.pipeline.run import RunResult, run

__all__ = ["Context", "RunResult", "canonical_json", "merge", "plan", "run"]
