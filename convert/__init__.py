"""HF → GGUF conversion (``quantkit.convert``)."""

from __future__ import annotations

from quantkit.convert.hf_to_gguf import ConvertResult, convert, parse_targets
from quantkit.convert.quantized import Artifact, QuantSettings

__all__ = ["Artifact", "ConvertResult", "QuantSettings", "convert", "parse_targets"]
