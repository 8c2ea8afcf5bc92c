"""HF → GGUF conversion (``quantkit.convert``)."""

from __future__ import annotations

from quantkit.convert.hf_to_gguf import ConvertResult, convert
from quantkit.convert.quantized import Artifact, QuantSettings

__all__ = ["Artifact", "ConvertResult", "QuantSettings", "convert"]
