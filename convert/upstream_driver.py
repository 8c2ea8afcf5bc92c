"""Runs llama.cpp's own ``convert_hf_to_gguf.py`` for quantkit (executed by path, never imported).

Usage: python upstream_driver.py SOURCE_DIR [convert_hf_to_gguf.py arguments...]

Self-contained (standard library + the llama.cpp source in SOURCE_DIR and its gguf-py, which the
caller puts on PYTHONPATH): quantkit is not imported here. One change to the converter's
behaviour, asked for through the environment: where llama.cpp's ``get_vocab_base_pre`` does not
recognise a byte-level BPE pre-tokenizer (it hashes a sample tokenization, so any retrained
vocabulary fails), ``QUANTKIT_BPE_PRE`` names the pre-tokenizer quantkit recognised from the
tokenizer's own definition (convert/tokenizer.py). A name upstream does recognise is kept.
"""

from __future__ import annotations

import os
import runpy
import sys


def main() -> None:
    source = sys.argv[1]
    script = os.path.join(source, "convert_hf_to_gguf.py")
    sys.path.insert(0, source)
    pre = os.environ.get("QUANTKIT_BPE_PRE") or None

    from conversion import base  # llama.cpp's conversion package (SOURCE_DIR/conversion)

    original = base.TextModel.get_vocab_base_pre

    def get_vocab_base_pre(self, tokenizer):  # type: ignore[no-untyped-def]
        try:
            return original(self, tokenizer)
        except NotImplementedError:
            if pre is None:
                raise
            print(f"quantkit: tokenizer.ggml.pre = {pre!r} (supplied by quantkit)", file=sys.stderr)
            return pre

    base.TextModel.get_vocab_base_pre = get_vocab_base_pre
    sys.argv = [script, *sys.argv[2:]]
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main()
