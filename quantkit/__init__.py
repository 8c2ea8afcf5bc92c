"""quantkit: export Hugging Face checkpoints as GGUF / vLLM formats, validated in the real engines."""

from __future__ import annotations

__version__ = "0.1.0"


def __getattr__(name: str):  # lazy: `import quantkit` stays cheap for the CLI
    if name in ("export", "ExportResult", "ExportArtifact"):
        from quantkit import api

        return getattr(api, name)
    raise AttributeError(f"module 'quantkit' has no attribute {name!r}")
