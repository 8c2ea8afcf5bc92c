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


def content_sha256(path: Path) -> str:
    """The sha256 an artifact is recorded with: a file's content, or for a folder (a vLLM or HF
    checkpoint) one hash over its files' names and contents."""
    return model_hash(path) if path.is_dir() else sha256_file(path)


def tree_size(path: Path) -> int:
    """Bytes of a file, or of every file in a folder."""
    if not path.is_dir():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def model_hash(model: Path) -> str:
    """sha256 over a model folder's files (names and contents), or one file's content."""
    h = hashlib.sha256()
    files = sorted(p for p in model.rglob("*") if p.is_file()) if model.is_dir() else [model]
    for p in files:
        h.update(str(p.relative_to(model) if model.is_dir() else p.name).encode() + b"\0")
        sha256_file(p, h)
    return h.hexdigest()
