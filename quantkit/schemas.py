"""Schemas of the Hugging Face files quantkit reads: config.json, tokenizer.json, tokenizer_config.json.

Only the fields quantkit reads are described, with their types and sane ranges; every other key
is allowed (HF configs legitimately carry dozens of keys per family, and a new transformers
release adds more). A file that breaks the schema fails with one line naming the file and the
key, before any of its values is used — so a string where a number belongs, or a vocab size of
10**12, is an error message rather than a traceback or an allocation.

quantkit's own configuration files (recipes) get models that reject unknown keys; these do not.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator
from pydantic import ValidationError as PydanticValidationError

from quantkit.errors import CheckpointError, InputError, TokenizerError

# Upper bounds well above every released model (largest vocabularies ~256k, hidden sizes ~16k,
# layers ~128) and far below what would make a lying config cost memory.
MAX_VOCAB = 1 << 24
MAX_DIM = 1 << 20
MAX_LAYERS = 1 << 12
MAX_CTX = 1 << 26

Pos = Annotated[StrictInt, Field(ge=1)]
Dim = Annotated[StrictInt, Field(ge=1, le=MAX_DIM)]
# strict float: a JSON int is accepted, a string or a bool is not; NaN/Infinity (which Python's
# json module parses) are not
Num = Annotated[float, Field(strict=True, allow_inf_nan=False)]
TokenId = Annotated[StrictInt, Field(ge=0, le=MAX_VOCAB)]


class _Open(BaseModel):
    """A JSON object whose other keys are kept and ignored."""

    model_config = ConfigDict(extra="allow")


class RopeConfig(_Open):
    rope_type: StrictStr | None = None
    type: StrictStr | None = None
    rope_theta: Annotated[Num, Field(gt=0)] | None = None
    factor: Annotated[Num, Field(gt=0)] | None = None
    original_max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=MAX_CTX)] | None = None
    low_freq_factor: Annotated[Num, Field(gt=0)] | None = None
    high_freq_factor: Annotated[Num, Field(gt=0)] | None = None
    extrapolation_factor: Num | None = None
    attention_factor: Num | None = None
    attn_factor: Num | None = None
    beta_fast: Num | None = None
    beta_slow: Num | None = None


class HFConfig(_Open):
    """config.json: the keys ``convert/archs`` reads."""

    architectures: list[StrictStr] | None = None
    auto_map: dict[str, Any] | None = None
    name_or_path: StrictStr | None = Field(default=None, alias="_name_or_path")
    hidden_size: Dim | None = None
    num_attention_heads: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)] | None = None
    num_key_value_heads: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)] | None = None
    num_hidden_layers: Annotated[StrictInt, Field(ge=1, le=MAX_LAYERS)] | None = None
    head_dim: Dim | None = None
    intermediate_size: Dim | None = None
    vocab_size: Annotated[StrictInt, Field(ge=1, le=MAX_VOCAB)] | None = None
    max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=MAX_CTX)] | None = None
    rms_norm_eps: Annotated[Num, Field(gt=0, lt=1)] | None = None
    tie_word_embeddings: StrictBool | None = None
    attention_bias: StrictBool | None = None
    mlp_bias: StrictBool | None = None
    rope_theta: Annotated[Num, Field(gt=0)] | None = None
    rope_scaling: RopeConfig | None = None
    # transformers 5: {rope_type, rope_theta, ...} or per-layer-kind {"full_attention": {...}}
    rope_parameters: dict[str, Any] | None = None
    original_max_position_embeddings: Annotated[StrictInt, Field(ge=1, le=MAX_CTX)] | None = None
    bos_token_id: TokenId | list[TokenId] | None = None
    eos_token_id: TokenId | list[TokenId] | None = None
    pad_token_id: TokenId | list[TokenId] | None = None
    text_config: dict[str, Any] | None = None
    # mixture of experts (convert/archs/moe.py)
    num_local_experts: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)] | None = None
    num_experts: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)] | None = None
    num_experts_per_tok: Annotated[StrictInt, Field(ge=1, le=MAX_DIM)] | None = None
    moe_intermediate_size: Dim | None = None
    shared_expert_intermediate_size: Annotated[StrictInt, Field(ge=0, le=MAX_DIM)] | None = None
    norm_topk_prob: StrictBool | None = None
    decoder_sparse_step: Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)] | None = None
    mlp_only_layers: list[Annotated[StrictInt, Field(ge=0, le=MAX_LAYERS)]] | None = None

    @model_validator(mode="after")
    def _heads(self) -> HFConfig:
        h, kv = self.num_attention_heads, self.num_key_value_heads
        if h is not None and kv is not None and h % kv:
            raise ValueError(
                f"num_attention_heads {h} is not a multiple of num_key_value_heads {kv}"
            )
        if self.hidden_size is not None and h is not None and self.head_dim is None:
            if self.hidden_size % h:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {h}"
                )
        rp = self.rope_parameters
        if rp is not None:
            inner = rp.get("full_attention", rp)
            try:
                RopeConfig.model_validate(inner)
            except PydanticValidationError as e:
                err = e.errors(include_url=False)[0]
                where = "rope_parameters" + (".full_attention" if inner is not rp else "")
                key = _loc(err["loc"], inner, err["type"])
                raise ValueError(
                    f"key '{where}.{key}': {err['msg']} (got {_shown(err['input'])})"
                ) from None
        return self


class AddedToken(_Open):
    id: TokenId
    content: StrictStr
    special: StrictBool | None = None
    lstrip: StrictBool | None = None
    rstrip: StrictBool | None = None
    single_word: StrictBool | None = None
    normalized: StrictBool | None = None


class Node(_Open):
    """A normalizer / pre-tokenizer / decoder / post-processor node; Sequences nest."""

    type: StrictStr | None = None
    pretokenizers: list[Node] | None = None
    normalizers: list[Node] | None = None
    decoders: list[Node] | None = None
    processors: list[Node] | None = None


class TokenizerModel(_Open):
    type: StrictStr | None = None
    # BPE: {token: id}; other model types (Unigram: [[piece, score], ...]) are refused later with
    # their own message, so any list passes here
    vocab: dict[str, TokenId] | list[Any] | None = None
    merges: (
        list[StrictStr | Annotated[list[StrictStr], Field(min_length=2, max_length=2)]] | None
    ) = None
    byte_fallback: StrictBool | None = None
    ignore_merges: StrictBool | None = None
    continuing_subword_prefix: StrictStr | None = None
    end_of_word_suffix: StrictStr | None = None
    unk_token: StrictStr | None = None


class TokenizerJSON(_Open):
    """tokenizer.json (the tokenizers library's file): the parts ``convert/tokenizer`` reads."""

    model: TokenizerModel
    added_tokens: list[AddedToken] | None = None
    normalizer: Node | None = None
    pre_tokenizer: Node | None = None
    decoder: Node | None = None
    post_processor: Node | None = None


SpecialToken = StrictStr | AddedToken | dict[str, Any] | None


class NamedTemplate(_Open):
    name: StrictStr
    template: StrictStr


class TokenizerConfig(_Open):
    """tokenizer_config.json: special tokens, add_*_token flags, the chat template."""

    bos_token: SpecialToken = None
    eos_token: SpecialToken = None
    unk_token: SpecialToken = None
    sep_token: SpecialToken = None
    pad_token: SpecialToken = None
    mask_token: SpecialToken = None
    cls_token: SpecialToken = None
    add_bos_token: StrictBool | None = None
    add_eos_token: StrictBool | None = None
    add_prefix_space: StrictBool | None = None
    clean_up_tokenization_spaces: StrictBool | None = None
    tokenizer_class: StrictStr | None = None
    chat_template: StrictStr | list[NamedTemplate] | None = None
    added_tokens_decoder: dict[str, _Open] | None = None

    @model_validator(mode="after")
    def _decoder_keys(self) -> TokenizerConfig:
        for key, entry in (self.added_tokens_decoder or {}).items():
            if not key.isdigit():
                raise ValueError(f"added_tokens_decoder key {key!r} is not a token id")
            content = (entry.model_extra or {}).get("content")
            if not isinstance(content, str):
                raise ValueError(f"added_tokens_decoder[{key}].content is not a string")
        return self


SCHEMAS: dict[str, tuple[type[BaseModel], type[InputError]]] = {
    "config.json": (HFConfig, CheckpointError),
    "tokenizer.json": (TokenizerJSON, TokenizerError),
    "tokenizer_config.json": (TokenizerConfig, TokenizerError),
}


def _loc(loc: tuple[Any, ...], data: Any, kind: str = "") -> str:
    """The key path of a pydantic error location, leaving out pydantic's names for union branches
    and validators (kept: the parts that really are keys or indices of ``data``, and the missing
    key of a "missing" error)."""
    out = ""
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part in node:
            out += ("." if out else "") + part
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            out += f"[{part}]"
            node = node[part]
    if kind == "missing" and loc:
        out += ("." if out else "") + str(loc[-1])
    return out


def _shown(value: Any) -> str:
    s = repr(value)
    return s if len(s) <= 40 else s[:37] + "..."


def check(kind: str, data: Any, path: Path | str) -> None:
    """Validate ``data`` (parsed JSON) against the schema of ``kind`` (a file name in SCHEMAS);
    raise the file's error type naming every offending key (up to 4)."""
    model, error = SCHEMAS[kind]
    if not isinstance(data, dict):
        raise error(f"{path}: {kind} is not a JSON object", None)
    try:
        model.model_validate(data)
    except PydanticValidationError as e:
        seen: dict[str, str] = {}
        for err in e.errors(include_url=False):
            key = _loc(err["loc"], data, err["type"])
            if key in seen or any(k.startswith(key + ".") for k in seen if key):
                continue  # one message per key (a union reports every branch), the deepest
            msg = err["msg"].removeprefix("Value error, ")
            if key:
                got = (
                    ""
                    if err["type"] in ("value_error", "missing")
                    else f" (got {_shown(err['input'])})"
                )
                seen[key] = f"key {key!r}: {msg}{got}"
            else:
                seen[key] = msg
        items = list(seen.values())
        more = f" (+{len(items) - 4} more)" if len(items) > 4 else ""
        raise error(
            f"{path}: {'; '.join(items[:4])}{more}",
            f"fix {kind}; quantkit reads these keys",
        ) from None
