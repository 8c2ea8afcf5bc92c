"""Native architectures. Importing this package registers every class in it."""

from __future__ import annotations

from quantkit.convert.archs import gemma as _gemma  # noqa: F401  (registers)
from quantkit.convert.archs import llama as _llama  # noqa: F401  (registers)
from quantkit.convert.archs import moe as _moe  # noqa: F401  (registers)
from quantkit.convert.archs import phi3 as _phi3  # noqa: F401  (registers)
from quantkit.convert.archs.base import REGISTRY, Architecture, resolve, supported

__all__ = ["REGISTRY", "Architecture", "resolve", "supported"]
