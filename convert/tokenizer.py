"""Hugging Face tokenizer files -> the GGUF vocabulary llama.cpp tokenizes with.

Two families are converted:

* ``llama`` (SentencePiece): ``tokenizer.model`` read with the ``sentencepiece`` protobuf, or a
  SentencePiece-style ``tokenizer.json`` (BPE with byte fallback and ``▁`` for spaces).
* ``gpt2`` (byte-level BPE): ``tokenizer.json`` with a ByteLevel pre-tokenizer.

For byte-level BPE, llama.cpp needs the *name* of its pre-tokenizer (``tokenizer.ggml.pre``), which
selects a hard-coded list of split regexes in ``src/llama-vocab.cpp`` (``llm_tokenizer_bpe``).
llama.cpp's own converter finds the name by hashing a sample tokenization
(``get_vocab_base_pre``), which fails for any retrained vocabulary. Here the name is found from
the tokenizer's own definition instead: the ``pre_tokenizer`` node of ``tokenizer.json`` is reduced
to the ordered list of regexes it splits with, and that list is looked up in ``PRE_TOKENIZERS``.

Nothing from the model directory is executed: JSON is parsed with the standard library and
``tokenizer.model`` with sentencepiece's protobuf schema.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from quantkit import schemas
from quantkit.errors import TokenizerError

logger = logging.getLogger(__name__)

MAX_JSON_BYTES = 512 * 1024 * 1024  # tokenizer.json of 256k-token vocabularies is ~35 MB
MAX_SPM_BYTES = 256 * 1024 * 1024

# gguf.TokenType values (gguf-py constants.py); sentencepiece's ModelProto.SentencePiece.Type
# enum uses the same numbers (NORMAL=1 UNKNOWN=2 CONTROL=3 USER_DEFINED=4 UNUSED=5 BYTE=6).
NORMAL = int(gguf.TokenType.NORMAL)
UNKNOWN = int(gguf.TokenType.UNKNOWN)
CONTROL = int(gguf.TokenType.CONTROL)
USER_DEFINED = int(gguf.TokenType.USER_DEFINED)
UNUSED = int(gguf.TokenType.UNUSED)
BYTE = int(gguf.TokenType.BYTE)

# Special-token kinds written as tokenizer.ggml.<kind>_token_id (GGUFWriter.add_<kind>_token_id).
SPECIAL_KINDS = ("bos", "eos", "eot", "eom", "unk", "sep", "pad", "mask")

# Token texts llama.cpp itself stops generation on (llama-vocab.cpp, "special_eog_ids" loop), and
# among them the end-of-turn / end-of-message ones ("find EOT token", "find EOM token"). Used to
# pick tokenizer.ggml.eot/eom among generation_config.json's extra eos ids.
LLAMA_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>",
        "<|im_end|>",
        "<|end|>",
        "<|return|>",
        "<|call|>",
        "<|flush|>",
        "<|calls|>",
        "<end_of_turn>",
        "<|endoftext|>",
        "</s>",
        "<|eom_id|>",
        "<EOT>",
        "_<EOT>",
        "[EOT]",
        "[EOS]",
        "<|end_of_text|>",
        "<end_of_utterance>",
        "<eos>",
        "<turn|>",
        "<|tool_response>",
        "<｜end▁of▁sentence｜>",
        "[e~[",
    }
)
EOT_TEXTS = frozenset(
    {"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<EOT>", "_<EOT>", "[EOT]"}
    | {"<end_of_utterance>"}
)
EOM_TEXTS = frozenset({"<|eom_id|>"})

SPIECE_SPACE = "\u2581"  # "▁", SentencePiece's escaped space
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


@dataclass
class Vocab:
    model: str  # tokenizer.ggml.model: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    pre: str | None  # tokenizer.ggml.pre (BPE only; "default" for SPM like llama.cpp's converter)
    tokens: list[str]  # by id, len == vocab size (padded with "[PAD{i}]" UNUSED slots)
    scores: list[float] | None
    token_types: list[int]  # gguf.TokenType values
    merges: list[str] | None
    special_ids: dict[str, int]  # keys among SPECIAL_KINDS
    add_bos: bool | None
    add_eos: bool | None
    # stored verbatim, never rendered: one template, or named ones [{"name", "template"}]
    chat_template: str | list[dict[str, str]] | None
    add_space_prefix: bool | None = None  # SPM only: tokenizer.ggml.add_space_prefix


# --------------------------------------------------------------------------------------------
# Pre-tokenizer table
# --------------------------------------------------------------------------------------------

# The GPT-2 regex: what a ByteLevel pre-tokenizer with use_regex=true splits with (tokenizers'
# byte_level.rs) and what llama.cpp lists for LLAMA_VOCAB_PRE_TYPE_GPT2.
RE_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
# Digits(individual_digits=true) splits every numeric char alone, Digits(false) numeric runs
# (tokenizers' digits.rs uses char::is_numeric, i.e. \p{N}).
RE_DIGIT = r"\p{N}"
RE_DIGITS = r"\p{N}+"
# Regexes as they appear in tokenizer.json; llama-vocab.cpp keeps each as "original regex from
# tokenizer.json" next to the adapted form it runs.
RE_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_QWEN35 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_TEKKEN = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
RE_SEED_CODER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1}"
    r"| ?[^\s\p{L}\p{N}\r\n]+|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# DeepSeek LLM / Coder / V3: several Split nodes (llama-vocab.cpp DEEPSEEK_LLM, DEEPSEEK_CODER,
# DEEPSEEK3_LLM lists, which copy tokenizer.json's patterns). Written with escapes: the letter class
# holds characters that Unicode normalization would change (U+2126 OHM SIGN, U+1FD3, ...), and an
# editor that normalizes the source would silently turn the ranges into different or empty ones.
RE_DEEPSEEK_LETTERS = (
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c"
    "\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5"
    "\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77"
    "\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59"
    "\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc"
    "\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107"
    "\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee"
    "\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e"
    "\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+"
)
RE_DEEPSEEK_PUNCT = "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+"
RE_DEEPSEEK_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
RE_DEEPSEEK3_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"
RE_DEEPSEEK3_MAIN = (
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"""| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer name and the tokenizer.json structure it corresponds to."""

    name: str  # tokenizer.ggml.pre, as accepted by llama_vocab::impl::load
    splits: tuple[str, ...]  # ordered split regexes (canonical tokenizer.json spelling)
    # What llama.cpp switches on for this name besides the regexes (llama_vocab::impl::load):
    ignore_merges: bool = False  # whole-word vocab hits skip BPE (model.ignore_merges)
    clean_spaces: bool = True  # detokenizer's clean_up_tokenization_spaces
    normalizer: str | None = None  # the normalizer the original ships (only a tie-break)


# Order matters only between entries with identical splits and flags (the first wins).
PRE_TOKENIZERS: tuple[PreTokenizer, ...] = (
    # Llama 3 family: Split(llama3 regex) + ByteLevel(use_regex=false); ignore_merges in both.
    PreTokenizer("llama-bpe", (RE_LLAMA3,), ignore_merges=True),
    # Same regex without ignore_merges (DBRX; llama.cpp's DBRX/SMAUG share LLAMA3's list).
    PreTokenizer("dbrx", (RE_LLAMA3,)),
    # Qwen2/2.5/3: Split(qwen2 regex) + ByteLevel(use_regex=false), NFC normalizer.
    PreTokenizer("qwen2", (RE_QWEN2,), clean_spaces=False, normalizer="NFC"),
    PreTokenizer("stablelm2", (RE_QWEN2,)),
    PreTokenizer("qwen35", (RE_QWEN35,), clean_spaces=False, normalizer="NFC"),
    PreTokenizer("seed-coder", (RE_SEED_CODER,), clean_spaces=False),
    # GPT-2: a bare ByteLevel(add_prefix_space=false, use_regex=true).
    # (llama.cpp's trillion/granite-docling lists are the same regex with clean_spaces=false;
    # "gpt-2" is kept for every such tokenizer because every llama.cpp build knows it.)
    PreTokenizer("gpt-2", (RE_GPT2,)),
    # StarCoder lineage: Digits(individual_digits=true) + ByteLevel(use_regex=true).
    PreTokenizer("starcoder", (RE_DIGIT, RE_GPT2)),
    PreTokenizer("smollm", (RE_DIGIT, RE_GPT2), clean_spaces=False),
    PreTokenizer("command-r", (RE_DIGIT, RE_GPT2), clean_spaces=False, normalizer="NFC"),
    # Mistral Tekken and GPT-4o-style (o200k) regexes.
    PreTokenizer("tekken", (RE_TEKKEN,), ignore_merges=True, clean_spaces=False),
    PreTokenizer("gpt-4o", (RE_GPT4O,), clean_spaces=False),
    # DeepSeek: several Split nodes, then Digits, then ByteLevel(use_regex=false).
    PreTokenizer(
        "deepseek-llm",
        (r"[\r\n]", RE_DEEPSEEK_LETTERS, RE_DEEPSEEK_PUNCT, r"\s+$", RE_DEEPSEEK_CJK, RE_DIGITS),
        clean_spaces=False,
    ),
    PreTokenizer(
        "deepseek-coder",
        (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", RE_DEEPSEEK_CJK, RE_DIGIT),
        clean_spaces=False,
    ),
    PreTokenizer(
        "deepseek-v3",
        (r"\p{N}{1,3}", RE_DEEPSEEK3_CJK, RE_DEEPSEEK3_MAIN),
        clean_spaces=False,
    ),
)

# Spellings that mean the same regex; tokenizer.json files use both.
_CASE_INSENSITIVE_CONTRACTIONS = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"
_EXPANDED_CONTRACTIONS = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"


def canonical_regex(pattern: str) -> str:
    """Spell a split regex one way: control characters escaped, contractions in (?i:) form."""
    out = pattern.replace("\r", r"\r").replace("\n", r"\n").replace("\t", r"\t")
    return out.replace(_EXPANDED_CONTRACTIONS, _CASE_INSENSITIVE_CONTRACTIONS)


@dataclass(frozen=True)
class _PreTokenizerShape:
    splits: tuple[str, ...]
    normalizer: str | None


def _describe_splits(splits: Iterable[str]) -> str:
    # Raw regex text (no JSON/Python escaping) so it can be compared with tokenizer.json by eye.
    return "[" + ", ".join(f"`{s}`" for s in splits) + "]"


def _pretokenizer_shape(tok: dict[str, Any], where: str) -> _PreTokenizerShape:
    """Reduce tokenizer.json's normalizer + pre_tokenizer to the regex list llama.cpp would need."""
    normalizer = _normalizer_kind(tok.get("normalizer"), where)
    node = tok.get("pre_tokenizer")
    if node is None:
        raise TokenizerError(
            f"{where}: byte-level BPE without a pre_tokenizer (no ByteLevel step)",
            "llama.cpp byte-level BPE needs a ByteLevel pre-tokenizer; this tokenizer cannot be "
            "converted faithfully",
        )
    steps = list(node.get("pretokenizers") or []) if node.get("type") == "Sequence" else [node]
    splits: list[str] = []
    byte_level_seen = False
    for i, step in enumerate(steps):
        kind = step.get("type")
        if byte_level_seen:
            raise TokenizerError(
                f"{where}: pre_tokenizer step {kind!r} comes after ByteLevel",
                "llama.cpp splits before the byte-level mapping; this order cannot be reproduced",
            )
        if kind == "Split":
            pattern = step.get("pattern") or {}
            if "Regex" in pattern:
                regex = str(pattern["Regex"])
            elif "String" in pattern:
                regex = re.escape(str(pattern["String"]))
            else:
                raise TokenizerError(f"{where}: Split pre-tokenizer without a pattern", None)
            behavior = step.get("behavior", "Isolated")
            if behavior != "Isolated" or step.get("invert", False):
                raise TokenizerError(
                    f"{where}: Split `{regex}` has behavior="
                    f"{behavior} invert={step.get('invert', False)}",
                    "llama.cpp only reproduces Split with behavior Isolated and invert false",
                )
            splits.append(canonical_regex(regex))
        elif kind == "Digits":
            splits.append(RE_DIGIT if step.get("individual_digits", False) else RE_DIGITS)
        elif kind == "ByteLevel":
            if step.get("add_prefix_space", False):
                raise TokenizerError(
                    f"{where}: ByteLevel pre-tokenizer with add_prefix_space=true",
                    "llama.cpp byte-level BPE never adds a prefix space; set add_prefix_space to "
                    "false only if the model was trained that way, otherwise this tokenizer "
                    "cannot be converted",
                )
            if step.get("use_regex", True):
                splits.append(RE_GPT2)
            byte_level_seen = True
        else:
            raise TokenizerError(
                f"{where}: pre_tokenizer step {i} is {kind!r}, which llama.cpp has no equivalent for",
                "supported steps: Split (Isolated), Digits, ByteLevel",
            )
    if not byte_level_seen:
        raise TokenizerError(
            f"{where}: byte-level BPE whose pre_tokenizer has no ByteLevel step "
            f"(splits {_describe_splits(splits)})",
            "llama.cpp applies the GPT-2 byte mapping after splitting; this tokenizer cannot be "
            "converted faithfully",
        )
    return _PreTokenizerShape(tuple(splits), normalizer)


def _normalizer_kind(node: dict[str, Any] | None, where: str) -> str | None:
    """None or "NFC"; anything else changes text in ways llama.cpp's BPE does not reproduce."""
    if node is None:
        return None
    kind = node.get("type")
    if kind == "Sequence":
        kinds = {_normalizer_kind(n, where) for n in node.get("normalizers") or []}
        kinds.discard(None)
        return kinds.pop() if kinds else None
    if kind == "NFC":
        # llama.cpp does not normalize; NFC is the identity on already-composed text.
        return "NFC"
    raise TokenizerError(
        f"{where}: normalizer {kind!r} on a byte-level BPE tokenizer",
        "llama.cpp's BPE tokenizer applies no normalizer (NFC alone is tolerated); this tokenizer "
        "cannot be converted faithfully",
    )


def match_pre_tokenizer(
    tok: dict[str, Any], *, clean_spaces: bool | None = None, where: str = "tokenizer.json"
) -> str:
    """The llama.cpp pre-tokenizer name for a byte-level BPE tokenizer.json (parsed)."""
    shape = _pretokenizer_shape(tok, where)
    candidates = [p for p in PRE_TOKENIZERS if p.splits == shape.splits]
    if not candidates:
        raise TokenizerError(
            f"{where}: pre-tokenizer splits {_describe_splits(shape.splits)} match no "
            "llama.cpp pre-tokenizer",
            "add an entry to quantkit.convert.tokenizer.PRE_TOKENIZERS if llama.cpp has a "
            "pre-tokenizer with exactly these regexes; otherwise llama.cpp cannot tokenize this "
            "model like Hugging Face does",
        )
    ignore_merges = bool((tok.get("model") or {}).get("ignore_merges", False))

    def fit(p: PreTokenizer) -> tuple[int, int, int]:
        return (
            p.ignore_merges == ignore_merges,
            clean_spaces is not None and p.clean_spaces == clean_spaces,
            p.normalizer == shape.normalizer,
        )

    best = max(candidates, key=fit)  # max() keeps the first of equals: table order
    if best.ignore_merges != ignore_merges:
        logger.warning(
            "%s: model.ignore_merges=%s but llama.cpp's %r pre-tokenizer uses ignore_merges=%s; "
            "words that are whole vocabulary entries may tokenize differently",
            where,
            ignore_merges,
            best.name,
            best.ignore_merges,
        )
    return best.name


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """A JSON file parsed with the standard library (None if absent), size-bounded."""
    if not path.is_file():
        return None
    size = path.stat().st_size
    if size > MAX_JSON_BYTES:
        raise TokenizerError(
            f"{path}: {size} bytes, over the {MAX_JSON_BYTES}-byte limit",
            "this is not a plausible tokenizer file",
        )
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})", "re-save the tokenizer") from None
    except RecursionError:  # "[[[[…" deeper than the interpreter's stack
        raise TokenizerError(f"{path}: nested too deeply to be real JSON", None) from None


def _content(entry: Any) -> str | None:
    """A special-token entry of tokenizer_config.json: a string or an AddedToken dict."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _config_vocab_size(config: dict[str, Any] | None) -> int | None:
    if not config:
        return None
    for cfg in (config, config.get("text_config") or {}):
        if isinstance(cfg.get("vocab_size"), int):
            return int(cfg["vocab_size"])
    return None


def looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter marks CONTROL even when not flagged special
    (conversion/base.py ``does_token_look_special``)."""
    return (
        text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")
        or (text.startswith("<|") and text.endswith("|>"))
        or (text.startswith("<｜") and text.endswith("｜>"))
        or (text.startswith("<unused") and text.endswith(">"))
    )


@dataclass
class _Added:
    id: int
    content: str
    special: bool


def _added_tokens(
    tok: dict[str, Any] | None, tcfg: dict[str, Any] | None, model_dir: Path
) -> list[_Added]:
    """Added tokens from tokenizer.json, tokenizer_config.json's added_tokens_decoder and
    added_tokens.json; later sources only fill ids the earlier ones lack."""
    found: dict[int, _Added] = {}
    for entry in (tok or {}).get("added_tokens") or []:
        if isinstance(entry.get("id"), int) and isinstance(entry.get("content"), str):
            found[entry["id"]] = _Added(entry["id"], entry["content"], bool(entry.get("special")))
            _warn_strip(entry, "tokenizer.json")
    for key, entry in ((tcfg or {}).get("added_tokens_decoder") or {}).items():
        try:
            tid = int(key)
        except ValueError:
            continue
        if tid not in found and isinstance(entry, dict) and isinstance(entry.get("content"), str):
            found[tid] = _Added(tid, entry["content"], bool(entry.get("special")))
            _warn_strip(entry, "tokenizer_config.json")
    extra = _read_json(model_dir / "added_tokens.json")
    if isinstance(extra, dict):
        for content, tid in extra.items():
            if isinstance(tid, int) and tid not in found:
                found[tid] = _Added(tid, content, False)
    return [found[k] for k in sorted(found)]


def _warn_strip(entry: dict[str, Any], where: str) -> None:
    # GGUF has no field for AddedToken.lstrip/rstrip/single_word; llama.cpp sets those attributes
    # only for a few token texts it knows. Text around such a token may tokenize differently.
    flags = [k for k in ("lstrip", "rstrip", "single_word") if entry.get(k)]
    if flags:
        logger.warning(
            "%s: added token %r has %s, which GGUF cannot carry; whitespace next to it may "
            "tokenize differently in llama.cpp",
            where,
            entry.get("content"),
            "/".join(flags),
        )


# --------------------------------------------------------------------------------------------
# SentencePiece
# --------------------------------------------------------------------------------------------


@dataclass
class _SpmTable:
    tokens: list[str]
    scores: list[float]
    types: list[int]
    add_space_prefix: bool | None


def _load_spm_model(path: Path) -> _SpmTable:
    """tokenizer.model through sentencepiece's ModelProto (protobuf), never its trainer."""
    size = path.stat().st_size
    if size > MAX_SPM_BYTES:
        raise TokenizerError(f"{path}: {size} bytes, over the {MAX_SPM_BYTES}-byte limit", None)
    try:
        from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    except ImportError as e:  # protobuf missing
        raise TokenizerError(
            f"{path}: cannot read SentencePiece model ({e})",
            "install the 'sentencepiece' and 'protobuf' packages",
        ) from None
    proto = spm_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as e:  # protobuf's DecodeError and friends
        raise TokenizerError(
            f"{path}: not a SentencePiece model ({type(e).__name__})",
            "a tiktoken or other non-protobuf tokenizer.model is not supported; provide "
            "tokenizer.json",
        ) from None
    if not proto.pieces:
        raise TokenizerError(f"{path}: SentencePiece model has no pieces", None)
    model_type = proto.trainer_spec.model_type  # UNIGRAM=1 BPE=2 WORD=3 CHAR=4
    if model_type != spm_pb2.TrainerSpec.BPE:
        name = spm_pb2.TrainerSpec.ModelType.Name(model_type)
        raise TokenizerError(
            f"{path}: SentencePiece model type {name}, llama.cpp's 'llama' tokenizer is BPE only",
            "Unigram models (T5 style) need llama.cpp's 't5' tokenizer, which quantkit does not "
            "write",
        )
    tokens: list[str] = []
    scores: list[float] = []
    types: list[int] = []
    for piece in proto.pieces:
        tokens.append(piece.piece)
        scores.append(float(piece.score))
        types.append(int(piece.type) if 1 <= int(piece.type) <= 6 else NORMAL)
    norm = proto.normalizer_spec
    # llama.cpp's SPM tokenizer escapes spaces and adds the dummy prefix, nothing else
    # (llm_tokenizer_spm_session); other normalizer settings only hold for text they leave as is.
    if norm.name not in ("", "identity"):
        logger.warning(
            "%s: SentencePiece normalization %r is not applied by llama.cpp; text that it would "
            "change (e.g. NFKC compatibility characters) may tokenize differently",
            path,
            norm.name,
        )
    if norm.remove_extra_whitespaces:
        logger.warning(
            "%s: SentencePiece remove_extra_whitespaces is not applied by llama.cpp's 'llama' "
            "tokenizer; runs of spaces may tokenize differently",
            path,
        )
    return _SpmTable(tokens, scores, types, bool(norm.add_dummy_prefix))


def _spm_from_tokenizer_json(tok: dict[str, Any], where: str) -> _SpmTable:
    """A SentencePiece-style BPE tokenizer.json (byte fallback, ▁ for spaces) as an SPM table.

    llama.cpp's SPM tokenizer merges the adjacent pair whose *result* has the highest score, while
    tokenizers applies the merge with the lowest rank. A token's score is therefore minus the rank
    of the first merge producing it, which orders merges the same way.
    """
    model = tok["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    merges = _merge_pairs(model.get("merges") or [], where)
    normalizer = tok.get("normalizer")
    pre = tok.get("pre_tokenizer")
    add_space_prefix = _spm_prefix_rule(normalizer, pre, where)
    size = max(vocab.values()) + 1 if vocab else 0
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [UNUSED] * size
    unreachable = -float(len(merges) + 1)
    scores = [unreachable] * size
    for text, tid in vocab.items():
        tokens[tid] = text
        types[tid] = BYTE if BYTE_TOKEN.fullmatch(text) else NORMAL
        if len(text) == 1:
            scores[tid] = 0.0
    for rank, (a, b) in enumerate(merges):
        tid = vocab.get(a + b)
        if tid is not None and scores[tid] == unreachable:
            scores[tid] = -float(rank)
    unk = model.get("unk_token")
    if isinstance(unk, str) and unk in vocab:
        types[vocab[unk]] = UNKNOWN
    return _SpmTable(tokens, scores, types, add_space_prefix)


def _spm_prefix_rule(normalizer: Any, pre: Any, where: str) -> bool:
    """Whether the SPM-style tokenizer.json prefixes "▁" (llama.cpp: add_space_prefix)."""

    def flat(node: Any, key: str) -> list[dict[str, Any]]:
        if not node:
            return []
        if node.get("type") == "Sequence":
            return [n for sub in node.get(key) or [] for n in flat(sub, key)]
        return [node]

    norms = flat(normalizer, "normalizers")
    pres = flat(pre, "pretokenizers")
    prepend = any(n.get("type") == "Prepend" and n.get("prepend") == SPIECE_SPACE for n in norms)
    replace = any(
        n.get("type") == "Replace"
        and (n.get("pattern") or {}).get("String") == " "
        and n.get("content") == SPIECE_SPACE
        for n in norms
    )
    others = [n.get("type") for n in norms if n.get("type") not in ("Prepend", "Replace")]
    if others:
        raise TokenizerError(
            f"{where}: SentencePiece-style normalizer step(s) {others} have no llama.cpp "
            "equivalent",
            "provide the original tokenizer.model",
        )
    for p in pres:
        if replace and p.get("type") == "Split" and (p.get("pattern") or {}).get("String") == " ":
            # transformers 5's GemmaTokenizer splits on " " after its normalizer turned every
            # " " into "▁": nothing is left to split on, so the step is a no-op
            continue
        if p.get("type") != "Metaspace":
            raise TokenizerError(
                f"{where}: SentencePiece-style tokenizer with pre_tokenizer {p.get('type')!r}",
                "llama.cpp's SentencePiece tokenizer does not split words; provide the original "
                "tokenizer.model",
            )
        if p.get("replacement", SPIECE_SPACE) != SPIECE_SPACE or p.get("split", False):
            raise TokenizerError(
                f"{where}: Metaspace pre-tokenizer with replacement="
                f"{p.get('replacement')!r} split={p.get('split')}",
                "llama.cpp's SentencePiece tokenizer only reproduces Metaspace('▁', split=false)",
            )
        scheme = p.get("prepend_scheme")
        if scheme is None:  # tokenizers < 0.15 wrote add_prefix_space
            scheme = "always" if p.get("add_prefix_space", True) else "never"
        return scheme != "never"  # "first": decided in _load_llama (_first_scheme_prefix)
    if not replace:
        raise TokenizerError(
            f"{where}: SentencePiece-style BPE that does not turn spaces into '▁'",
            "provide the original tokenizer.model",
        )
    return prepend


def _merge_pairs(merges: list[Any], where: str) -> list[tuple[str, str]]:
    """tokenizer.json merges in either spelling: "a b" strings or [a, b] lists."""
    pairs: list[tuple[str, str]] = []
    for i, m in enumerate(merges):
        if isinstance(m, str):
            parts = m.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{where}: merge {i} {m!r} is not 'left right'", None)
            pairs.append((parts[0], parts[1]))
        elif isinstance(m, list) and len(m) == 2 and all(isinstance(s, str) for s in m):
            pairs.append((m[0], m[1]))
        else:
            raise TokenizerError(f"{where}: merge {i} has an unknown form {m!r}", None)
    return pairs


def _gguf_merges(merges: list[Any], where: str) -> list[str]:
    """Merges as GGUF stores them ("left right"). The common string form is already that, so a
    50k-merge vocabulary is checked without splitting and re-joining every entry."""
    kinds = set(map(type, merges))
    fast: list[str] | None = None
    if kinds == {str}:
        fast = list(merges)
    elif kinds == {list}:
        try:
            fast = [a + " " + b for a, b in merges]
        except (TypeError, ValueError):  # not pairs of strings: the slow path names the entry
            fast = None
    # each entry has at least its separator; exactly one space each means no part has one
    if fast is not None and "\n".join(fast).count(" ") == len(fast):
        return fast
    out: list[str] = []
    for a, b in _merge_pairs(merges, where):
        if " " in a or " " in b:
            # llama.cpp splits a merge at its first space (llama_vocab::impl::load)
            raise TokenizerError(
                f"{where}: merge ({a!r}, {b!r}) contains a space, which GGUF merges cannot carry",
                "this is not a byte-level vocabulary; it cannot be converted",
            )
        out.append(f"{a} {b}")
    return out


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_vocab(
    model_dir: Path, vocab_size: int | None = None, config_dir: Path | None = None
) -> Vocab:
    """Read the tokenizer of a Hugging Face model directory.

    ``vocab_size`` is the model's embedding row count; None takes config.json's ``vocab_size``
    (else the tokenizer's own size). Ids between the tokenizer's size and ``vocab_size`` become
    ``[PAD{i}]`` UNUSED tokens, as llama.cpp's converter writes them. ``config_dir``: where
    config.json and generation_config.json (stop ids) are read when they are not beside the
    tokenizer (a fine-tune's adapter folder with its own tokenizer: its base model's folder).
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise TokenizerError(f"{model_dir}: not a directory", "pass the model directory")
    cfg_dir = (
        model_dir if config_dir is None or (model_dir / "config.json").is_file() else config_dir
    )
    config = _read_json(cfg_dir / "config.json")
    tok = _read_json(model_dir / "tokenizer.json")
    tcfg = _read_json(model_dir / "tokenizer_config.json")
    # schema first: every key read below has the type and range it needs (quantkit/schemas.py)
    if config is not None and not isinstance(config, dict):
        raise TokenizerError(f"{model_dir / 'config.json'}: not a JSON object", None)
    for name, data in (("tokenizer.json", tok), ("tokenizer_config.json", tcfg)):
        if data is not None:
            schemas.check(name, data, model_dir / name)
    if vocab_size is None:
        vocab_size = _config_vocab_size(config)
    spm_path = model_dir / "tokenizer.model"

    if tok is not None:
        kind = _tokenizer_json_kind(tok, model_dir / "tokenizer.json")
        if kind == "gpt2":
            return _load_bpe(model_dir, tok, tcfg, config, vocab_size, cfg_dir)
        if spm_path.is_file():
            table = _load_spm_model(spm_path)
        else:
            table = _spm_from_tokenizer_json(tok, str(model_dir / "tokenizer.json"))
        return _load_llama(model_dir, table, tok, tcfg, config, vocab_size, cfg_dir)
    if spm_path.is_file():
        table = _load_spm_model(spm_path)
        return _load_llama(model_dir, table, None, tcfg, config, vocab_size, cfg_dir)
    if (model_dir / "vocab.json").is_file():
        raise TokenizerError(
            f"{model_dir}: vocab.json/merges.txt without tokenizer.json",
            "load the tokenizer with transformers and save_pretrained() it to write tokenizer.json",
        )
    raise TokenizerError(
        f"{model_dir}: no tokenizer.json or tokenizer.model",
        "copy the tokenizer files of the base model into the model directory",
    )


def _tokenizer_json_kind(tok: dict[str, Any], path: Path) -> str:
    """'gpt2' for byte-level BPE, 'llama' for SentencePiece-style BPE; anything else is an error."""
    model = tok.get("model") or {}
    mtype = model.get("type")
    if mtype is None and "merges" in model and "vocab" in model:
        mtype = "BPE"  # very old tokenizers files omit the type
    if mtype != "BPE":
        raise TokenizerError(
            f"{path}: tokenizer model type {mtype!r}, not BPE",
            "only BPE tokenizers (byte-level or SentencePiece-style) are converted",
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"{path}: BPE with {key}={model[key]!r}", "not supported")

    def has_type(node: Any, name: str) -> bool:
        if not isinstance(node, dict):
            return False
        if node.get("type") == name:
            return True
        subs = node.get("pretokenizers") or node.get("decoders") or node.get("normalizers") or []
        return any(has_type(s, name) for s in subs)

    if has_type(tok.get("pre_tokenizer"), "ByteLevel") or has_type(tok.get("decoder"), "ByteLevel"):
        return "gpt2"
    if (
        model.get("byte_fallback")
        or has_type(tok.get("pre_tokenizer"), "Metaspace")
        or has_type(tok.get("normalizer"), "Prepend")
    ):
        return "llama"
    raise TokenizerError(
        f"{path}: BPE that is neither byte-level (ByteLevel) nor SentencePiece-style "
        "(byte_fallback/Metaspace)",
        "llama.cpp has no tokenizer for this BPE variant",
    )


def _load_bpe(
    model_dir: Path,
    tok: dict[str, Any],
    tcfg: dict[str, Any] | None,
    config: dict[str, Any] | None,
    vocab_size: int | None,
    cfg_dir: Path,
) -> Vocab:
    where = str(model_dir / "tokenizer.json")
    model = tok["model"]
    vocab: dict[str, int] = model.get("vocab") or {}
    added = _added_tokens(tok, tcfg, model_dir)
    size = max([*vocab.values(), *(a.id for a in added), -1]) + 1
    n = _padded_size(size, vocab_size, where)
    tokens = [f"[PAD{i}]" for i in range(n)]
    types = [UNUSED] * n
    for text, tid in vocab.items():
        if tid >= n:
            raise _out_of_range(where, text, tid, n)
        tokens[tid] = text
        types[tid] = NORMAL
    for a in added:
        if a.id >= n:
            raise _out_of_range(where, a.content, a.id, n)
        # Added tokens are stored as raw text (not byte-mapped); llama.cpp matches them verbatim.
        tokens[a.id] = a.content
        types[a.id] = CONTROL if a.special or looks_special(a.content) else USER_DEFINED
    _check_unique(tokens, where)

    merges = _gguf_merges(model.get("merges") or [], where)
    pre = match_pre_tokenizer(tok, clean_spaces=_hf_cleans_spaces(tcfg), where=where)
    _warn_if_transformers_rebuilds(tok, tcfg, where)
    special_ids, add_bos, add_eos = _special_tokens(
        model_dir, tokens, types, tok, tcfg, config, cfg_dir
    )
    return Vocab(
        model="gpt2",
        pre=pre,
        tokens=tokens,
        scores=None,
        token_types=types,
        merges=merges,
        special_ids=special_ids,
        add_bos=False if add_bos is None else add_bos,  # HF adds nothing unless told to
        add_eos=False if add_eos is None else add_eos,
        chat_template=_chat_template(model_dir, tcfg),
    )


def _hf_cleans_spaces(tcfg: dict[str, Any] | None) -> bool:
    """Whether transformers' decode() cleans up spaces for this BPE tokenizer.

    transformers >= 5 defaults clean_up_tokenization_spaces to False and skips the clean-up for
    BPE models unless clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output is
    also set (tokenization_utils_tokenizers.py, decode).
    """
    cfg = tcfg or {}
    return bool(cfg.get("clean_up_tokenization_spaces", False)) and bool(
        cfg.get("clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", False)
    )


# transformers >= 5 tokenizer classes whose __init__ rebuilds the pipeline with a hard-coded
# pre-tokenizer, keeping only vocab/merges/post_processor from tokenizer.json
# (models/gpt2/tokenization_gpt2.py, models/qwen2/tokenization_qwen2.py in transformers 5.24).
TRANSFORMERS_FIXED_PRE: dict[str, tuple[str, ...]] = {
    "GPT2Tokenizer": (RE_GPT2,),
    "Qwen2Tokenizer": (RE_QWEN2,),
}


def _warn_if_transformers_rebuilds(
    tok: dict[str, Any], tcfg: dict[str, Any] | None, where: str
) -> None:
    cls = str((tcfg or {}).get("tokenizer_class") or "").removesuffix("Fast")
    fixed = TRANSFORMERS_FIXED_PRE.get(cls)
    if fixed is None:
        return
    splits = _pretokenizer_shape(tok, where).splits
    if splits != fixed:
        logger.warning(
            "%s: tokenizer_config.json names %s, which transformers >= 5 rebuilds with the "
            "pre-tokenizer %s instead of this file's %s; the GGUF follows tokenizer.json (what "
            "the tokenizers library and the model's training use), so transformers' ids differ",
            where,
            cls,
            _describe_splits(fixed),
            _describe_splits(splits),
        )


def _load_llama(
    model_dir: Path,
    table: _SpmTable,
    tok: dict[str, Any] | None,
    tcfg: dict[str, Any] | None,
    config: dict[str, Any] | None,
    vocab_size: int | None,
    cfg_dir: Path,
) -> Vocab:
    where = str(model_dir)
    base = len(table.tokens)
    added = _added_tokens(tok, tcfg, model_dir)
    n = _padded_size(max([base, *(a.id + 1 for a in added)]), vocab_size, where)
    if base > n:
        raise _out_of_range(where, table.tokens[n], n, n)
    # llama.cpp's converter pads with "[PAD{i}]", score -10000, UNUSED (_create_vocab_sentencepiece)
    tokens = table.tokens + [f"[PAD{i}]" for i in range(base, n)]
    scores = table.scores + [-10000.0] * (n - base)
    types = table.types + [UNUSED] * (n - base)
    for a in added:
        if a.id >= n:
            # as llama.cpp's converter: an added id past the embedding is dropped, with a warning
            logger.warning(
                "%s: added token %r id %d >= vocab size %d, ignored", where, a.content, a.id, n
            )
            continue
        if a.id < base and tokens[a.id] == a.content and types[a.id] in (CONTROL, UNKNOWN, BYTE):
            continue  # the SentencePiece piece itself (<unk>, <s>, </s>, <0x..>)
        if a.special or looks_special(a.content):
            types[a.id] = CONTROL
            text = a.content
        else:
            types[a.id] = USER_DEFINED
            text = a.content.replace(SPIECE_SPACE, " ")  # pre-normalized, as llama.cpp expects
        if a.id < base and tokens[a.id] != text:
            logger.warning(
                "%s: token %d %r replaced by added token %r", where, a.id, tokens[a.id], text
            )
        tokens[a.id] = text
        scores[a.id] = -1000.0
    _check_unique(tokens, where)
    special_ids, add_bos, add_eos = _special_tokens(
        model_dir, tokens, types, tok, tcfg, config, cfg_dir
    )
    add_prefix = (tcfg or {}).get("add_prefix_space")
    chat_template = _chat_template(model_dir, tcfg)
    space_prefix = add_prefix if isinstance(add_prefix, bool) else table.add_space_prefix
    if _metaspace_scheme(tok) == "first":
        space_prefix = _first_scheme_prefix(where, chat_template is not None)
    return Vocab(
        model="llama",
        pre="default",
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=None,
        special_ids=special_ids,
        add_bos=True if add_bos is None else add_bos,  # LlamaTokenizer's defaults
        add_eos=False if add_eos is None else add_eos,
        chat_template=chat_template,
        add_space_prefix=space_prefix,
    )


def _metaspace_scheme(tok: dict[str, Any] | None) -> str | None:
    """The prepend_scheme of tokenizer.json's Metaspace pre-tokenizer (None without one)."""
    node = (tok or {}).get("pre_tokenizer") or {}
    steps = (node.get("pretokenizers") or []) if node.get("type") == "Sequence" else [node]
    for p in steps:
        if isinstance(p, dict) and p.get("type") == "Metaspace":
            scheme = p.get("prepend_scheme")
            if scheme is None:  # tokenizers < 0.15 wrote add_prefix_space
                scheme = "always" if p.get("add_prefix_space", True) else "never"
            return str(scheme)
    return None


def _first_scheme_prefix(where: str, chat: bool) -> bool:
    """add_space_prefix for a Metaspace ``prepend_scheme: first`` tokenizer, which llama.cpp
    cannot reproduce: it prefixes "▁" at the start of the text *and after every special token*
    (llama-vocab.cpp, ``is_prev_special``), or nowhere. Measured on a SentencePiece vocabulary
    with [INST]/[/INST] and a Mistral-style template (8 chat prompts, 300 TinyStories lines):
    with the prefix, 0/8 chat prompts match transformers (an extra "▁" after each special
    token) and 299/300 plain texts; without it, 8/8 chat prompts and 1/300 plain texts (the
    first word loses its "▁"). A model with a chat template is served with chat prompts, so it
    gets no prefix; one without keeps it."""
    logger.warning(
        "%s: Metaspace prepend_scheme='first' (\u2581 only at the very start of the text) has "
        "no llama.cpp equivalent; %s",
        where,
        "writing add_space_prefix=false so that chat prompts (which start with a special "
        "token) tokenize as in transformers; a plain text that starts without a special token "
        "loses the \u2581 before its first word in llama.cpp"
        if chat
        else "writing add_space_prefix=true (plain text tokenizes as in transformers); after "
        "every special token llama.cpp adds a \u2581 that transformers does not",
    )
    return not chat


def _padded_size(size: int, vocab_size: int | None, where: str) -> int:
    if vocab_size is None:
        return size
    if vocab_size <= 0:
        raise TokenizerError(f"{where}: vocab_size {vocab_size} is not positive", None)
    return vocab_size


def _out_of_range(where: str, text: str, tid: int, n: int) -> TokenizerError:
    return TokenizerError(
        f"{where}: token {text!r} has id {tid}, beyond the model's vocab_size {n}",
        "the tokenizer does not belong to this model, or config.json's vocab_size is wrong",
    )


def _check_unique(tokens: list[str], where: str) -> None:
    from quantkit.convert.loadcheck import unique_token_ids

    unique_token_ids(tokens, where, TokenizerError)


# --------------------------------------------------------------------------------------------
# Special tokens, BOS/EOS, chat template
# --------------------------------------------------------------------------------------------


def _special_tokens(
    model_dir: Path,
    tokens: list[str],
    types: list[int],
    tok: dict[str, Any] | None,
    tcfg: dict[str, Any] | None,
    config: dict[str, Any] | None,
    cfg_dir: Path,
) -> tuple[dict[str, int], bool | None, bool | None]:
    """Special ids and add_bos/add_eos, from the files in the order transformers reads them:
    tokenizer_config.json, special_tokens_map.json, then config.json / generation_config.json ids
    (gguf-py's SpecialVocab reads tokenizer_config.json then config.json the same way)."""
    by_text = {t: i for i, t in enumerate(tokens)}
    n = len(tokens)
    ids: dict[str, int] = {}

    def set_id(kind: str, tid: Any, source: str) -> None:
        if kind in ids or isinstance(tid, bool) or not isinstance(tid, int):
            return
        if 0 <= tid < n:
            ids[kind] = tid
        else:
            logger.warning(
                "%s: %s id %d out of range (vocab size %d), ignored", source, kind, tid, n
            )

    def set_text(kind: str, text: str | None, source: str) -> None:
        if kind in ids or text is None:
            return
        if text in by_text:
            ids[kind] = by_text[text]
        else:
            logger.warning("%s: %s token %r is not in the vocabulary, ignored", source, kind, text)

    stmap = _read_json(model_dir / "special_tokens_map.json") or {}
    gen = _read_json(cfg_dir / "generation_config.json") or {}
    for kind in ("bos", "eos", "unk", "sep", "pad", "mask"):
        set_text(kind, _content((tcfg or {}).get(f"{kind}_token")), "tokenizer_config.json")
        set_text(kind, _content(stmap.get(f"{kind}_token")), "special_tokens_map.json")
    if "bos" not in ids:  # BERT-style configs name it cls
        set_text("bos", _content((tcfg or {}).get("cls_token")), "tokenizer_config.json")
    sources = (("config.json", config or {}), ("generation_config.json", gen))
    for name, cfg in sources:
        cfgs = [cfg, cfg.get("text_config") or {}]
        for kind in ("bos", "eos", "unk", "sep", "pad", "mask"):
            for c in cfgs:
                value = c.get(f"{kind}_token_id")
                set_id(kind, value[0] if isinstance(value, list) and value else value, name)

    _stop_ids_to_eog(ids, tokens, types, sources)

    # tokenizer.json's post_processor is what the tokenizers library runs, and transformers >= 5
    # keeps it (add_bos_token in tokenizer_config.json does not change it, measured with 5.24);
    # the add_*_token flags only decide when there is no tokenizer.json post_processor.
    add_bos, add_eos = _post_processor_adds(tok, by_text, ids)
    for kind, current in (("bos", add_bos), ("eos", add_eos)):
        flag = (tcfg or {}).get(f"add_{kind}_token")
        if not isinstance(flag, bool):
            continue
        if current is None:
            if kind == "bos":
                add_bos = flag
            else:
                add_eos = flag
        elif current != flag:
            logger.warning(
                "tokenizer_config.json: add_%s_token=%s disagrees with tokenizer.json's "
                "post_processor (%s); following the post_processor, which is what is applied",
                kind,
                flag,
                current,
            )
    if add_bos and "bos" not in ids:
        raise TokenizerError(
            f"{model_dir}: the tokenizer adds a BOS token but names none",
            "set bos_token in tokenizer_config.json",
        )
    if add_eos and "eos" not in ids:
        raise TokenizerError(
            f"{model_dir}: the tokenizer adds an EOS token but names none",
            "set eos_token in tokenizer_config.json",
        )
    return ids, add_bos, add_eos


def _stop_ids_to_eog(
    ids: dict[str, int],
    tokens: list[str],
    types: list[int],
    sources: Iterable[tuple[str, dict[str, Any]]],
) -> None:
    """Make every declared stop id one llama.cpp ends generation on.

    llama.cpp's end-of-generation set (llama-vocab.cpp, ``special_eog_ids``) is the eos, eot and
    eom ids, the FIM pad/rep/sep ids, and tokens whose text is in its list (``LLAMA_EOG_TEXTS``);
    no token attribute adds to it. So the stop ids of config.json / generation_config.json
    (``eos_token_id``, an int or a list) that are neither eos nor EOG by text take the eot and
    eom slots: end-of-turn / end-of-message texts first, then any other stop. The FIM slots are
    not used: llama-server's /infill would insert those ids. A stop that finds no slot is named
    in a warning: llama.cpp will generate past it."""
    n = len(tokens)
    stops: list[int] = []
    for _, cfg in sources:
        for c in (cfg, cfg.get("text_config") or {}):
            value = c.get("eos_token_id")
            for tid in value if isinstance(value, list) else [value]:
                if isinstance(tid, int) and not isinstance(tid, bool) and 0 <= tid < n:
                    if tid not in stops and tid != ids.get("eos"):
                        stops.append(tid)
    for tid in stops:
        if tokens[tid] in EOM_TEXTS and "eom" not in ids:
            ids["eom"] = tid
        elif tokens[tid] in EOT_TEXTS and "eot" not in ids:
            ids["eot"] = tid
    taken = {ids.get(k) for k in ("eos", "eot", "eom")}
    for tid in stops:
        if tid in taken or tokens[tid] in LLAMA_EOG_TEXTS:
            continue
        slot = next((k for k in ("eot", "eom") if k not in ids), None)
        if slot is None:
            logger.warning(
                "stop token %d %r (generation_config.json/config.json eos_token_id) cannot be "
                "marked as end-of-generation in GGUF: llama.cpp stops only on eos, eot, eom "
                "(taken by %s) and tokens it knows by text; generation in llama.cpp will not "
                "stop on it (pass it as a stop string to the server)",
                tid,
                tokens[tid],
                ", ".join(f"{k}={tokens[ids[k]]!r}" for k in ("eos", "eot", "eom") if k in ids),
            )
            continue
        ids[slot] = tid
        taken.add(tid)
        if types[tid] != CONTROL:
            logger.warning(
                "stop token %d %r is not a control token; llama.cpp prints it as text",
                tid,
                tokens[tid],
            )


def _post_processor_adds(
    tok: dict[str, Any] | None, by_text: dict[str, int], ids: dict[str, int]
) -> tuple[bool | None, bool | None]:
    """What tokenizer.json's post_processor adds around a single sequence (TemplateProcessing).

    A template that starts (ends) with a special token adds BOS (EOS); when that token differs
    from the configured bos (eos), the template's token is what HF actually emits, so it becomes
    the bos (eos) id.
    """
    node = (tok or {}).get("post_processor")
    if not node:
        return None, None
    procs = (node.get("processors") or []) if node.get("type") == "Sequence" else [node]
    add_bos: bool | None = None
    add_eos: bool | None = None
    for p in procs:
        kind = p.get("type")
        if kind == "ByteLevel":  # offsets only: adds nothing
            add_bos = False if add_bos is None else add_bos
            add_eos = False if add_eos is None else add_eos
            continue
        if kind in ("RobertaProcessing", "BertProcessing"):  # <cls> A <sep>
            cls_, sep = p.get("cls") or [None, None], p.get("sep") or [None, None]
            for k, (_, tid) in (("bos", cls_), ("eos", sep)):
                if isinstance(tid, int):
                    ids[k] = tid
            add_bos, add_eos = isinstance(cls_[1], int), isinstance(sep[1], int)
            continue
        if kind != "TemplateProcessing":
            raise TokenizerError(
                f"tokenizer.json: post_processor {kind!r} is not understood",
                "llama.cpp can only add one BOS and one EOS token",
            )
        single = p.get("single") or []
        specials: dict[str, Any] = p.get("special_tokens") or {}
        token_of = _template_token_resolver(specials, by_text)
        first = token_of(single[0]) if single else None
        last = token_of(single[-1]) if len(single) > 1 else None
        if len([i for i in single if "SpecialToken" in i]) > (first is not None) + (
            last is not None
        ):
            raise TokenizerError(
                "tokenizer.json: post_processor puts special tokens inside the sequence",
                "llama.cpp adds at most one BOS and one EOS",
            )
        add_bos, add_eos = first is not None, last is not None
        for kind, tid in (("bos", first), ("eos", last)):
            if tid is not None and ids.get(kind) != tid:
                if kind in ids:
                    logger.warning(
                        "tokenizer.json: post_processor adds token %d, not the configured %s %d; "
                        "using %d as %s",
                        tid,
                        kind,
                        ids[kind],
                        tid,
                        kind,
                    )
                ids[kind] = tid
    return add_bos, add_eos


def _template_token_resolver(
    specials: dict[str, Any], by_text: dict[str, int]
) -> Callable[[dict[str, Any]], int | None]:
    """Maps a TemplateProcessing item to the id it emits (None for a sequence placeholder)."""

    def token_of(item: dict[str, Any]) -> int | None:
        sid = (item.get("SpecialToken") or {}).get("id")
        if sid is None:
            return None
        emitted = (specials.get(sid) or {}).get("ids") or []
        if len(emitted) > 1:
            raise TokenizerError(
                f"tokenizer.json: post_processor adds {len(emitted)} tokens for {sid!r}",
                "llama.cpp adds at most one BOS and one EOS",
            )
        return emitted[0] if emitted else by_text.get(sid)

    return token_of


def _chat_template(
    model_dir: Path, tcfg: dict[str, Any] | None
) -> str | list[dict[str, str]] | None:
    """tokenizer_config.json's chat_template, else chat_template.jinja / chat_template.json.

    Named templates (a list of {name, template}, e.g. ``default`` + ``tool_use``) are kept as a
    list: gguf-py's ``GGUFWriter.add_chat_template`` writes ``tokenizer.chat_template`` (default)
    and ``tokenizer.chat_template.<name>`` + ``tokenizer.chat_templates``, which is where
    llama.cpp's ``llama_model_chat_template(model, name)`` looks (llama-server takes
    ``tool_use`` for requests with tools). Names are written with non-alphanumerics as ``_``
    (gguf-py's rule)."""
    value: Any = (tcfg or {}).get("chat_template")
    if value is None and (model_dir / "chat_template.jinja").is_file():
        value = (model_dir / "chat_template.jinja").read_text(encoding="utf-8")
    if value is None:
        value = (_read_json(model_dir / "chat_template.json") or {}).get("chat_template")
    extra = model_dir / "additional_chat_templates"  # transformers >= 5: <name>.jinja
    if extra.is_dir() and not isinstance(value, list):
        named = {p.stem: p.read_text(encoding="utf-8") for p in sorted(extra.glob("*.jinja"))}
        if named:
            default = [{"name": "default", "template": value}] if isinstance(value, str) else []
            value = default + [{"name": n, "template": t} for n, t in named.items()]
    if isinstance(value, list):
        named = [
            {"name": str(t["name"]), "template": t["template"]}
            for t in value
            if isinstance(t, dict)
            and isinstance(t.get("name"), str)
            and isinstance(t.get("template"), str)
        ]
        if not any(t["name"] == "default" for t in named) and named:
            # llama.cpp falls back to tool_use when there is no default (common/chat.cpp)
            logger.warning(
                "%s: named chat templates %s without 'default'; llama.cpp uses 'tool_use' "
                "(else ChatML) for requests without tools, transformers refuses them",
                model_dir,
                [t["name"] for t in named],
            )
        return named or None
    return value if isinstance(value, str) else None


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def write_vocab(writer: gguf.GGUFWriter, vocab: Vocab) -> None:
    """Add the tokenizer.ggml.* keys (and the chat template) for ``vocab`` to ``writer``."""
    n = len(vocab.tokens)
    if len(vocab.token_types) != n or (vocab.scores is not None and len(vocab.scores) != n):
        raise TokenizerError("vocabulary: tokens, scores and types differ in length", None)
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    if vocab.scores is not None:
        writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.token_types)
    if vocab.merges:
        writer.add_token_merges(vocab.merges)
    for kind in SPECIAL_KINDS:
        if kind in vocab.special_ids:
            getattr(writer, f"add_{kind}_token_id")(vocab.special_ids[kind])
    if vocab.add_bos is not None:
        writer.add_add_bos_token(vocab.add_bos)
    if vocab.add_eos is not None:
        writer.add_add_eos_token(vocab.add_eos)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.chat_template is not None:
        writer.add_chat_template(vocab.chat_template)
