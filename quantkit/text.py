"""Reading evaluation and calibration text exactly as llama.cpp's tools do.

Python's text mode translates "\\r\\n" to "\\n"; llama-perplexity and llama-imatrix read the file's
bytes as they are. wiki.test.raw has CRLF line ends, and the translation alone moved SmolLM2's
perplexity by ~9 % on two chunks, so every data file is read here, as bytes, decoded as UTF-8.
"""

from __future__ import annotations

import os
from pathlib import Path


def read_text(path: str | os.PathLike[str]) -> str:
    return Path(path).read_bytes().decode("utf-8", errors="replace")
