"""Where quantkit keeps what it builds once per user: one root, one named folder per kind.

The root is ``$QUANTKIT_CACHE``, else ``$XDG_CACHE_HOME/quantkit``, else ``~/.cache/quantkit``
(the same rule as scripts/install.sh, which fills ``sdist/`` and ``wheels/`` before quantkit is
installed). Every clone and worktree shares it; the folder names below are where existing caches
already live, so they do not change.
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    root = os.environ.get("QUANTKIT_CACHE")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "quantkit"


def envs_dir() -> Path:
    """Engine environments (quantkit/envs.py)."""
    return cache_root() / "envs"


def models_dir() -> Path:
    """The embedded default model's HF checkpoint (quantkit/demo.py)."""
    return cache_root() / "models"


def reference_dir() -> Path:
    """Reference log-probs of ``validate`` (validate/harness.py), by content key."""
    return cache_root() / "validate" / "reference"


def capabilities_dir() -> Path:
    """The measured capability matrix per engine and host (validate/capabilities.py)."""
    return cache_root() / "capabilities"


def capability_artifacts_dir() -> Path:
    """The small artifacts the capability matrix is measured on (validate/capability_artifacts.py)."""
    return capabilities_dir() / "artifacts"


def sensitivity_dir() -> Path:
    """Per-tensor sensitivities of ``gguf:auto`` (quantize/gguf/auto/sensitivity.py)."""
    return cache_root() / "auto-sensitivity"


def vllm_sensitivity_dir() -> Path:
    """gptq:auto's per-group sensitivity measurements (quantize/vllm/auto/sensitivity.py)."""
    return cache_root() / "vllm-auto-sensitivity"


def sdist_dir() -> Path:
    """llama-cpp-python source distributions (scripts/install.sh downloads them)."""
    return cache_root() / "sdist"


def upstream_dir() -> Path:
    """llama.cpp's own converter, extracted per engine version (convert/upstream.py)."""
    return cache_root() / "upstream"
