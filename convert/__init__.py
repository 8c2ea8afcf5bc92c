"""HF → GGUF conversion (``quantkit.convert``)."""

from __future__ import annotations

from quantkit.convert.hf_to_gguf import (
    Artifact,
    ConvertResult,
    QuantSettings,
    convert,
)

__all__ = ["Artifact", "ConvertResult", "QuantSettings", "convert"]
