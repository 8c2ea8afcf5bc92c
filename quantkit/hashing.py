"""Content hashes of files and model folders: cache keys and the sha256 recorded per artifact."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

BLOCK = 1 << 22  # bytes per read: few reads per file, bounded memory


def sha256_file(path: Path, h: Any = None) -> str:
    """sha256 of a file's content; with ``h`` given, the content is added to that hash instead
    and its digest so far returned."""
    h = h or hashlib.sha256()
    with path.open("rb") as f:
        while b := f.read(BLOCK):
            h.update(b)
    return h.hexdigest()


def model_hash(model: Path) -> str:
    """sha256 over a model folder's files (names and contents), or one file's content."""
    h = hashlib.sha256()
    files = sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else [model]
    for p in files:
        h.update(str(p.relative_to(model) if model.is_dir() else p.name).encode() + b"\0")
        sha256_file(p, h)
    return h.hexdigest()
