"""quantkit: export Hugging Face checkpoints as GGUF / vLLM formats, validated in the real engines."""

from __future__ import annotations

__version__ = "0.1.0"
