"""Calibration samples for llm-compressor: token windows of the calibration text, cut as
`quantkit imatrix` cuts its chunks."""

from __future__ import annotations

from pathlib import Path

from quantkit.errors import InputError

# -- calibration ---------------------------------------------------------------------------------


# tokenizer_config.json classes for which transformers 5 uses tokenizer.json as it is (the
# "tokenizers" backend): the ``tokenizers`` library then gives the same ids without importing
# transformers (checked in tests/test_vllm_export.py). Other classes, or add_bos_token /
# add_eos_token overrides, go through transformers.
_AS_IS_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def tokenize_calibration(model_dir: Path, text: str) -> tuple[list[int], int | None]:
    """``validate.harness.tokenize_reference``'s ids and BOS, with the ``tokenizers`` library
    alone where the model's tokenizer is a plain tokenizer.json."""
    from quantkit.checkpoint import read_json

    cfg_file, tok_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    cfg = read_json(cfg_file) if cfg_file.is_file() else {}
    plain = (
        isinstance(cfg, dict)
        and tok_file.is_file()
        and cfg.get("tokenizer_class") in _AS_IS_TOKENIZERS
        and not ({"add_bos_token", "add_eos_token"} & cfg.keys())
    )
    try:
        from tokenizers import Tokenizer
    except ImportError:
        plain = False
    if not plain:
        from quantkit.validate.harness import tokenize_reference

        return tokenize_reference(model_dir, text)
    tok = Tokenizer.from_file(str(tok_file))
    ids = tok.encode(text, add_special_tokens=False).ids
    probe = tok.encode("a", add_special_tokens=True).ids
    bos_tok = cfg.get("bos_token")
    if isinstance(bos_tok, dict):  # AddedToken written as a dict
        bos_tok = bos_tok.get("content")
    bos = tok.token_to_id(bos_tok) if isinstance(bos_tok, str) else None
    adds_bos = bos is not None and len(probe) > 0 and probe[0] == bos
    return ([bos] + list(ids) if adds_bos else list(ids)), (bos if adds_bos else None)


def calibration_ids(model_dir: Path, calib: Path, samples: int, seq_len: int):
    """``samples`` consecutive windows of ``seq_len`` tokens of the calibration text, each
    starting with BOS when the tokenizer adds one (llama-imatrix's chunking, quantize/gguf/imatrix.py)."""
    import numpy as np

    from quantkit.quantize.gguf.imatrix import chunk_tokens
    from quantkit.text import read_text

    if not calib.is_file():
        raise InputError(f"{calib}: calibration text not found")
    ids, bos = tokenize_calibration(model_dir, read_text(calib))
    have = len(ids) // seq_len
    if have < samples:
        raise InputError(
            f"{calib}: {len(ids)} tokens make {have} samples of {seq_len}, {samples} asked",
            f"pass --samples {max(have, 1)}"
            + (f" or --seq-len {len(ids) // samples}" if len(ids) // samples >= 16 else "")
            + " or a longer text",
        )
    chunks = chunk_tokens(ids, seq_len, samples, bos)
    return np.asarray(chunks, dtype=np.int64)
