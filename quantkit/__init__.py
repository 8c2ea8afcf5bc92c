"""quantkit: export Hugging Face checkpoints as GGUF / vLLM formats, validated in the real engines."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import quantkit` stays cheap for the CLI
    if name == "export":
        from quantkit.pipeline.export import export

        return export
    if name in ("BuildResult", "Artifact", "ExportOptions"):
        from quantkit.pipeline import build

        return getattr(build, name)
    if name in ("parse_target", "parse_targets"):
        from quantkit import targets

        return getattr(targets, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
