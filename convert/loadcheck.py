"""Every GGUF model quantkit writes is one llama.cpp loads.

Two layers, both before a file gets its final name:

- **Rules known ahead.** llama.cpp sets per-token attributes by the model's ``general.name``
  (llama-vocab.cpp, ``llama_vocab::impl::load``, "set attributes by model/tokenizer/architecture
  name"), and the Phi-3 rule looks its tokens up with ``unordered_map::at``: a vocabulary without
  one of them fails to load with "error loading model vocabulary: unordered_map::at". The same
  block's other rules (``<mask>`` for jina-v2 tokenizers and nomic-bert-moe / jina-bert-v3,
  ``[MASK]`` for names containing "modern-bert") test ``token_to_id.count`` first and only warn,
  so they never stop a load. These are checked in the preflight from the vocabulary and the name
  (``check_name_rules``), every missing token listed, before anything is written; for a GGUF
  someone else wrote (llama.cpp's converter, a GGUF given to requantize) from its metadata
  (``check_gguf_vocab``), which also refuses duplicate token texts: llama.cpp asserts they are
  unique (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``), an abort no caller survives.
- **A vocab-only load** (``check_loads``): the temporary file opened by llama.cpp itself with
  ``llama_model_params.vocab_only``, for causes quantkit does not know yet. It parses the GGUF
  header and every tensor's byte range (``llama_model_loader`` checks each lies inside the
  file), resolves the architecture and loads the whole vocabulary (tokenizer model,
  pre-tokenizer, merges, special tokens, the name rules); it skips hyper-parameters and tensor
  shapes (``llama_model_base::load_hparams`` returns right after general.name;
  ``llama_model_load`` returns before ``load_tensors``), which the logit tests cover. A file
  llama.cpp refuses is refused with llama.cpp's own message and, where one is known, its cause.

Cost of the load (median of 15 loads, 2-core AMD EPYC Zen 5 shared with other jobs, load average
3–7): 0.13–0.21 s per file of the embedded default model (SmolLM2-135M: 49152 tokens and their
BPE merges), F16 and Q4_K_M alike since tensors are not read; 0.6 ms for a tiny model (512
tokens). Converting that default model to F16 takes about 1.8 s on the same machine.
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path

from quantkit.errors import GGUFLoadError, QuantkitError


@dataclass(frozen=True)
class NameRule:
    """A name-keyed branch of llama-vocab.cpp's token-attribute block that needs tokens."""

    substrings: tuple[str, ...]  # matched in general.name, lowercased (std::tolower there)
    tokens: tuple[str, ...]  # looked up with unordered_map::at


# llama-vocab.cpp (llama.cpp of llama-cpp-python 0.3.36): `_contains_any(model_name, {"phi-3",
# "phi3"})` sets attributes on "</s>", "<unk>", "<s>" and "<|endoftext|>" through
# `token_to_id.at(token)`.
NAME_RULES: tuple[NameRule, ...] = (
    NameRule(("phi-3", "phi3"), ("<unk>", "<s>", "</s>", "<|endoftext|>")),
)
# The branch tested before the name rules in the same if/else chain: a tokenizer or architecture
# matched there takes the <mask> rule and never reaches the Phi-3 one.
FIRST_BRANCH_PRE = ("jina-v2-de", "jina-v2-es", "jina-v2-code")
FIRST_BRANCH_ARCH = ("nomic-bert-moe", "jina-bert-v3")
# what llama.cpp says when a rule's token is missing (std::out_of_range's what() in libstdc++)
RULE_FAILURE = "error loading model vocabulary: unordered_map::at"


@dataclass(frozen=True)
class RuleProblem:
    name: str
    matched: str  # the substring of the name that triggers the rule
    required: tuple[str, ...]
    missing: tuple[str, ...]

    def message(self, *, failure: bool = True) -> str:
        """What is wrong; ``failure``: with the message llama.cpp fails with."""
        return (
            f"general.name {self.name!r} contains {self.matched!r}, for which llama.cpp requires "
            f"the tokens {' '.join(self.required)}; the vocabulary lacks {' '.join(self.missing)}"
            + (f' (llama.cpp fails with "{RULE_FAILURE}")' if failure else "")
        )

    def renamed(self) -> str:
        """The name with the trigger taken out: "Phi-3-mini" → "Phi-mini", "tiny-phi3" → "tiny-phi"."""
        out = re.sub(r"(phi)-?3", r"\1", self.name, flags=re.IGNORECASE)
        return out if out.strip() else "model"


def name_rule_problem(
    name: str, tokens: Collection[str], *, arch: str = "", pre: str | None = None
) -> RuleProblem | None:
    """The name rule ``name`` triggers in llama.cpp and the tokens it needs that are missing."""
    if any(s in (pre or "") for s in FIRST_BRANCH_PRE) or any(s in arch for s in FIRST_BRANCH_ARCH):
        return None
    lowered = name.lower()
    have = tokens if isinstance(tokens, set | frozenset | dict) else set(tokens)
    for rule in NAME_RULES:
        hit = next((s for s in rule.substrings if s in lowered), None)
        if hit is None:
            continue
        missing = tuple(t for t in rule.tokens if t not in have)
        return RuleProblem(name, hit, rule.tokens, missing) if missing else None
    return None


def rename_hint(problem: RuleProblem, how: str = "convert with --name") -> str:
    return (
        f"{how} {problem.renamed()!r} (a name without 'phi3' or 'phi-3'), "
        f"or add {' '.join(problem.missing)} to the tokenizer"
    )


def check_name_rules(
    name: str, tokens: Collection[str], *, arch: str, pre: str | None, where: str = ""
) -> None:
    """Refuse a model ``name`` whose llama.cpp name rule needs tokens ``tokens`` lacks."""
    problem = name_rule_problem(name, tokens, arch=arch, pre=pre)
    if problem is not None:
        raise GGUFLoadError(f"{where}{problem.message()}", rename_hint(problem))


def _gguf_vocab(path: Path) -> tuple[str, str, str | None, list[str]]:
    """general.name, general.architecture, tokenizer.ggml.pre and the token texts of a GGUF."""
    from quantkit.quantize.gguf.reader import read_gguf

    md = read_gguf(path, keep_arrays=("tokenizer.ggml.tokens",)).metadata
    tokens = md.get("tokenizer.ggml.tokens")
    pre = md.get("tokenizer.ggml.pre")
    return (
        str(md.get("general.name") or ""),
        str(md.get("general.architecture") or ""),
        str(pre) if pre is not None else None,
        [str(t) for t in tokens] if isinstance(tokens, list) else [],
    )


def check_gguf_vocab(
    path: Path, shown: str | None = None, *, how: str = "convert with --name"
) -> None:
    """What llama.cpp's vocabulary loader would refuse (or abort on) in a GGUF written by
    someone else, read from its metadata: a name rule's missing tokens, duplicate token texts.
    ``shown`` names the file in messages (default: its file name)."""
    label = f"{shown or path.name}: "
    name, arch, pre, tokens = _gguf_vocab(path)
    seen = unique_token_ids(tokens, shown or path.name)
    problem = name_rule_problem(name, seen, arch=arch, pre=pre)
    if problem is not None:
        raise GGUFLoadError(f"{label}{problem.message()}", rename_hint(problem, how))


def unique_token_ids(
    tokens: Sequence[str], where: str, error: type[QuantkitError] = GGUFLoadError
) -> dict[str, int]:
    """Each token text's id. A text at two ids is ``error``: llama.cpp asserts that every token
    text is unique (``GGML_ASSERT(id_to_token.size() == token_to_id.size())``, llama-vocab.cpp),
    an abort no caller survives, so the converter refuses such a vocabulary before writing and
    the load check refuses a GGUF written by someone else."""
    seen: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if t in seen:
            raise error(
                f"{where}: token text {t!r} appears at ids {seen[t]} and {i}",
                "llama.cpp needs every token text to be unique (it aborts on a file without)",
            )
        seen[t] = i
    return seen


# "llama_model_load: error loading model: error loading model vocabulary: unordered_map::at":
# the function name, then llama_model_load's own prefix, then what failed
_LOG_PREFIX = re.compile(r"^\w+:\s+(?:error loading model:\s+)?")


def _engine_message(log: str) -> str:
    """The first line of llama.cpp's log that says what failed (the most specific one: the
    loader's own "failed to load model" follows it)."""
    lines = [ln.strip() for ln in log.splitlines() if ln.strip()]
    # the metadata dump ("llama_model_loader: - kv 2: general.name str = ...") quotes the file
    said = [ln for ln in lines if not ln.startswith("llama_model_loader: - ")]
    errors = [ln for ln in said if "error" in ln.lower() or "failed" in ln.lower()]
    picked = errors[0] if errors else (said[-1] if said else "no message")
    return _LOG_PREFIX.sub("", picked)


def check_loads(path: Path, shown: str | None = None, *, how: str = "convert with --name") -> None:
    """Load ``path`` in llama.cpp with ``vocab_only``; a file it cannot load is refused
    (GGUFLoadError) with llama.cpp's message. ``shown`` names the file in the message (the name
    it is about to get; default: its own)."""
    from quantkit.quantize.gguf.libllama import llama_cpp, log_listener, signals_deferred

    lib = llama_cpp()
    params = lib.llama_model_default_params()
    params.vocab_only = True
    fragments: list[str] = []
    with log_listener(fragments.append), signals_deferred():
        model = lib.llama_model_load_from_file(os.fsencode(path), params)
    if model:
        lib.llama_model_free(model)
        return
    label = shown or path.name
    why = _engine_message("".join(fragments))
    cause, hint = None, "QUANTKIT_DEBUG=1 shows llama.cpp's whole log"
    try:
        name, arch, pre, tokens = _gguf_vocab(path)
        problem = name_rule_problem(name, tokens, arch=arch, pre=pre)
    except QuantkitError:  # a file quantkit's reader refuses too: llama.cpp's message says why
        problem = None
    if problem is not None:
        cause, hint = problem.message(failure=False), rename_hint(problem, how)
    raise GGUFLoadError(
        f"llama.cpp cannot load {label}: {why}" + (f"; {cause}" if cause else ""), hint
    )
