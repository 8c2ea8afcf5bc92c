"""A corpus of malformed inputs, generated here, each with a valid neighbour.

Every case is one edit of a good file, made either the bad way or the honest way:
- bad: quantkit exits 2 with one line on stderr that names the file and the specific problem,
  writes nothing at the output path, and stays within a memory bound (traced Python/numpy
  allocations; lying headers claim up to 2**64 bytes);
- honest (the neighbour): the same command succeeds, so the harness itself is not what fails.

Cases run quantkit's CLI entry point in this process (``quantkit.cli.main``: the same click layer,
error table and exit codes as the installed command, without a fresh interpreter per case);
``test_lying_lengths_cost_no_memory`` runs a few of them as real subprocesses and bounds their
peak RSS against their neighbours'.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
MEMORY_BOUND = 32 * 2**20  # traced bytes; the good tiny model converts in a few MB


# -- safetensors editing ---------------------------------------------------------------------


def st_read(f: Path) -> tuple[dict, bytes]:
    raw = f.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def st_write(f: Path, header: dict | str, data: bytes, hlen: int | None = None) -> None:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    text += b" " * (-len(text) % 8)
    f.write_bytes(struct.pack("<Q", len(text) if hlen is None else hlen) + text + data)


def by_offset(header: dict) -> list[str]:
    names = [k for k in header if k != "__metadata__"]
    return sorted(names, key=lambda k: header[k]["data_offsets"][0])


def st_edit(fn: Callable[[dict, bytes, bool], tuple[dict | str, bytes, int | None]]):
    """A case editing model.safetensors: fn(header, data, bad) -> (header, data, header length)."""

    def edit(model: Path, bad: bool) -> None:
        f = model / "model.safetensors"
        header, data = st_read(f)
        h, d, hlen = fn(header, data, bad)
        st_write(f, h, d, hlen)

    return edit


def set_entry(name: str, key: str, bad_value, good_value=None):
    def fn(h: dict, d: bytes, bad: bool):
        if bad or good_value is not None:
            h[name][key] = bad_value if bad else good_value
        return h, d, None

    return st_edit(fn)


NORM0 = "model.layers.0.input_layernorm.weight"
NORM1 = "model.layers.1.input_layernorm.weight"
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


def _overlap(h: dict, d: bytes, bad: bool):
    a, b = h[NORM0]["data_offsets"], h[NORM1]["data_offsets"]
    if a[0] > b[0]:
        a, b = b, a
    first, second = (NORM0, NORM1) if h[NORM0]["data_offsets"] is a else (NORM1, NORM0)
    if bad:  # the later tensor points at the earlier one's bytes
        h[second]["data_offsets"] = list(a)
    else:  # the two equal-sized tensors swap places: still a valid file
        h[first]["data_offsets"], h[second]["data_offsets"] = list(b), list(a)
    return h, d, None


def _hole(h: dict, d: bytes, bad: bool):
    gap = 8 if bad else 0
    last = by_offset(h)[-1]
    b, e = h[last]["data_offsets"]
    h[last]["data_offsets"] = [b + gap, e + gap]
    return h, d[:b] + b"\0" * gap + d[b:], None


def _past_end(h: dict, d: bytes, bad: bool):
    last = by_offset(h)[-1]
    if bad:
        h[last]["data_offsets"][1] += 4
    return h, d, None


def _duplicate(h: dict, d: bytes, bad: bool):
    text = json.dumps(h)
    entry = json.dumps(h[NORM0])
    name = NORM0 if bad else "extra.unused"
    if not bad:  # a distinct extra tensor at the end of the data: valid, reported as unused
        n = len(d)
        entry = json.dumps({"dtype": "F32", "shape": [2], "data_offsets": [n, n + 8]})
        d = d + b"\0" * 8
    return text[:-1] + f', "{name}": {entry}}}', d, None


def _deep(h: dict, d: bytes, bad: bool):
    depth = 100_000 if bad else 10
    h["__metadata__"] = {"format": "pt"}
    text = json.dumps(h)[:-1] + ', "x": ' + "[" * depth + "]" * depth + "}"
    if not bad:  # shallow nesting is only an odd entry, which the reader must reject by name
        return h, d, None
    return text, d, None


# -- GGUF building ---------------------------------------------------------------------------

U32, F32_V, STRING, ARRAY = 4, 6, 8, 9  # GGUF value types (ggml/docs/gguf.md)


def gs(s: bytes | str, length: int | None = None) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack("<Q", len(b) if length is None else length) + b


def kv_u32(key: str, v: int, vtype: int = U32) -> bytes:
    return gs(key) + struct.pack("<II", vtype, v)


def gguf_blob(
    *,
    magic: bytes = b"GGUF",
    version: int = 3,
    kvs: list[bytes] | None = None,
    tensors: list[tuple[str, list[int], int, int]] | None = None,
    n_kv: int | None = None,
    n_tensors: int | None = None,
    alignment: int = 32,
    data_bytes: int | None = None,
) -> bytes:
    """A GGUF with the given raw key/value entries and tensor infos (name, dims, type, offset);
    the data section is sized to hold every tensor unless ``data_bytes`` says otherwise."""
    kvs = [gs("general.architecture") + struct.pack("<I", STRING) + gs("llama")] + (kvs or [])
    if tensors is None:
        tensors = [("token_embd.weight", [8, 4], 0, 0), ("blk.0.attn_q.weight", [32, 2], 8, 128)]
    out = magic + struct.pack("<IQQ", version, n_tensors if n_tensors is not None else len(tensors),
                              n_kv if n_kv is not None else len(kvs))  # fmt: skip
    out += b"".join(kvs)
    need = 0
    for name, dims, ttype, off in tensors:
        out += gs(name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        out += struct.pack("<IQ", ttype, off)
        n = int(np.prod(dims))
        size = n * 4 if ttype == 0 else n // 32 * 34 if ttype == 8 else n * 4
        need = max(need, off + size)
    out += b"\0" * (-len(out) % alignment)
    return out + bytes((i * 7) % 251 for i in range(need if data_bytes is None else data_bytes))


def gguf_case(fn: Callable[[bool], bytes]):
    def edit(d: Path, bad: bool) -> None:
        (d / "m.gguf").write_bytes(fn(bad))

    return edit


def json_edit(file: str, fn: Callable[[dict, bool], object]):
    def edit(model: Path, bad: bool) -> None:
        p = model / file
        data = json.loads(p.read_text())
        out = fn(data, bad)
        p.write_text(out if isinstance(out, str) else json.dumps(out))

    return edit


KEEP = object()  # the neighbour leaves the key as it is


def set_key(file: str, key: str, bad_value, good_value=KEEP):
    def fn(data: dict, bad: bool):
        if bad or good_value is not KEEP:
            data[key] = bad_value if bad else good_value
        return data

    return json_edit(file, fn)


def weights_edit(fn: Callable[[dict, bool], None]):
    def edit(model: Path, bad: bool) -> None:
        from safetensors.numpy import load_file, save_file

        t = load_file(model / "model.safetensors")
        fn(t, bad)
        save_file(t, model / "model.safetensors", metadata={"format": "pt"})

    return edit


def _set_weight(value_bad: float, value_good: float):
    def fn(t: dict, bad: bool) -> None:
        t[O_PROJ][3, 5] = value_bad if bad else value_good

    return fn


def _tok_added_id(data: dict, bad: bool):
    data["added_tokens"][0]["id"] = (
        str(data["added_tokens"][0]["id"]) if bad else data["added_tokens"][0]["id"]
    )
    return data


def _tok_merge(data: dict, bad: bool):
    m = data["model"]["merges"]
    m[0] = 5 if bad else m[0]
    return data


def _tok_vocab(data: dict, bad: bool):
    v = data["model"]["vocab"]
    k = next(iter(v))
    v[k] = str(v[k]) if bad else v[k]
    return data


def _delete(file: str):
    def edit(model: Path, bad: bool) -> None:
        if bad:
            (model / file).unlink()

    return edit


def _write(file: str, bad_text: str):
    def edit(model: Path, bad: bool) -> None:
        if bad:
            (model / file).write_text(bad_text)

    return edit


def _raw(bad_bytes: bytes):
    def edit(model: Path, bad: bool) -> None:
        if bad:
            (model / "model.safetensors").write_bytes(bad_bytes)

    return edit


def _truncate(model: Path, bad: bool) -> None:
    f = model / "model.safetensors"
    if bad:
        f.write_bytes(f.read_bytes()[:-1000])


@dataclass
class Case:
    id: str
    kind: str  # "convert" (model folder) or "inspect" (a GGUF file)
    edit: Callable[[Path, bool], None]
    expect: str  # the specific part of the one-line message

    @property
    def file(self) -> str:
        """The file the message must name."""
        if self.id == "w-missing-tensor":  # about the checkpoint as a whole: names the tensor
            return ""
        for prefix, name in FILE_OF.items():
            if self.id.startswith(prefix):
                return name
        raise KeyError(self.id)


FILE_OF = {
    "st-": "model.safetensors",
    "w-": "model.safetensors",
    "cfg-": "config.json",
    "tok-": "tokenizer.json",
    "tcfg-": "tokenizer_config.json",
    "gg-": "m.gguf",
}


K = "tokenizer.json"
TC = "tokenizer_config.json"
CASES: list[Case] = [
    # --- safetensors -------------------------------------------------------------------------
    Case("st-empty", "convert", _raw(b""), "truncated safetensors file (0 bytes, no header)"),
    Case("st-short", "convert", _raw(b"\x01\x02\x03"), "truncated safetensors file (3 bytes"),
    Case("st-header-len-huge", "convert",
         st_edit(lambda h, d, bad: (h, d, 10**15 if bad else None)), "is over the 100 MB limit"),
    Case("st-header-len-past-eof", "convert",
         st_edit(lambda h, d, bad: (h, d, 50_000_000 if bad else None)),
         "header length 50000000 runs past the end of the file"),
    Case("st-header-not-json", "convert",
         st_edit(lambda h, d, bad: ("{not json" + " " * 30 if bad else h, d, None)),
         "safetensors header is not valid JSON"),
    Case("st-header-array", "convert",
         st_edit(lambda h, d, bad: ("[1, 2, 3]" if bad else h, d, None)),
         "safetensors header is not a JSON object"),
    Case("st-header-deep", "convert", st_edit(_deep), "safetensors header is nested too deeply"),
    Case("st-duplicate-tensor", "convert", st_edit(_duplicate),
         f"safetensors header repeats tensor '{NORM0}'"),
    Case("st-unknown-dtype", "convert", set_entry(NORM0, "dtype", "F128", "F32"),
         f"tensor '{NORM0}' has unknown dtype 'F128'"),
    Case("st-dtype-number", "convert", set_entry(NORM0, "dtype", 4, "F32"),
         f"tensor '{NORM0}' has unknown dtype 4"),
    # found by bench/fuzz.py: a list is unhashable, and the dtype lookup raised TypeError
    Case("st-dtype-list", "convert", set_entry(NORM0, "dtype", ["F32"], "F32"),
         f"tensor '{NORM0}' has unknown dtype ['F32']"),
    Case("st-wrong-dtype-size", "convert", set_entry(NORM0, "dtype", "F16", "F32"),
         f"tensor '{NORM0}' has 256 bytes but shape [64] × F16 needs 128"),
    Case("st-negative-dim", "convert", set_entry(NORM0, "shape", [-64], [64]),
         f"tensor '{NORM0}' has an invalid shape [-64]"),
    Case("st-shape-string", "convert", set_entry(NORM0, "shape", "64", [64]),
         f"tensor '{NORM0}' has an invalid shape '64'"),
    Case("st-shape-overflow", "convert", set_entry(NORM0, "shape", [2**62, 2**62, 2**62], [64]),
         f"tensor '{NORM0}' has 256 bytes but shape"),
    Case("st-offsets-reversed", "convert", st_edit(lambda h, d, bad: (
        h if not bad else {**h, NORM0: {**h[NORM0], "data_offsets": h[NORM0]["data_offsets"][::-1]}},
        d, None)), f"tensor '{NORM0}' has invalid data_offsets"),
    Case("st-offsets-not-pair", "convert", set_entry(NORM0, "data_offsets", [0], None),
         f"tensor '{NORM0}' has invalid data_offsets [0]"),
    Case("st-range-past-end", "convert", st_edit(_past_end), "past the end of the data"),
    Case("st-overlap", "convert", st_edit(_overlap), "overlaps the previous tensor's bytes"),
    Case("st-hole", "convert", st_edit(_hole), "hole of 8 bytes before tensor"),
    Case("st-trailing-bytes", "convert",
         st_edit(lambda h, d, bad: (h, d + (b"\0" * 16 if bad else b""), None)),
         "16 bytes after the last tensor belong to none"),
    Case("st-metadata-list", "convert", st_edit(lambda h, d, bad: (
        {**h, "__metadata__": [1] if bad else {"format": "pt"}}, d, None)),
         "safetensors __metadata__ is not an object"),
    Case("st-entry-not-object", "convert", st_edit(lambda h, d, bad: (
        {**h, "__metadata__": {"format": "pt"}, NORM0: "weights" if bad else h[NORM0]}, d, None)),
         f"tensor '{NORM0}' entry is not an object"),
    Case("st-truncated-data", "convert", _truncate, "the file is truncated"),
    # --- weights -------------------------------------------------------------------------------
    Case("w-nan", "convert", weights_edit(_set_weight(np.nan, 0.5)),
         f"tensor '{O_PROJ}' contains NaN or Inf"),
    Case("w-inf", "convert", weights_edit(_set_weight(np.inf, 1e3)),
         f"tensor '{O_PROJ}' contains NaN or Inf"),
    Case("w-f16-overflow", "convert", weights_edit(_set_weight(1e6, 6e4)),
         f"tensor '{O_PROJ}' has values up to 1e+06, beyond the F16 range (±65504)"),
    Case("w-int-dtype", "convert", weights_edit(
        lambda t, bad: t.update({O_PROJ: t[O_PROJ].astype(np.int32 if bad else np.float32)})),
         f"tensor '{O_PROJ}' is I32; only F32/F16/BF16 weights convert"),
    Case("w-missing-tensor", "convert", weights_edit(
        lambda t, bad: t.pop(O_PROJ) if bad else None), f"missing tensors: {O_PROJ}"),
    # --- config.json -----------------------------------------------------------------------------
    Case("cfg-broken-json", "convert", _write("config.json", '{"architectures": ['),
         "config.json is not valid JSON"),
    Case("cfg-not-object", "convert", _write("config.json", "[]"),
         "config.json is not a JSON object"),
    Case("cfg-hidden-size-string", "convert", set_key("config.json", "hidden_size", "64", 64),
         "key 'hidden_size': Input should be a valid integer (got '64')"),
    Case("cfg-zero-layers", "convert", set_key("config.json", "num_hidden_layers", 0, 2),
         "key 'num_hidden_layers': Input should be greater than or equal to 1"),
    Case("cfg-vocab-huge", "convert", set_key("config.json", "vocab_size", 10**12, 512),
         "key 'vocab_size': Input should be less than or equal to 16777216"),
    Case("cfg-kv-heads", "convert", set_key("config.json", "num_key_value_heads", 3, 2),
         "num_attention_heads 4 is not a multiple of num_key_value_heads 3"),
    Case("cfg-rope-factor-string", "convert", set_key(
        "config.json", "rope_scaling", {"rope_type": "linear", "factor": "2"},
        {"rope_type": "linear", "factor": 2.0}),
         "key 'rope_scaling.factor': Input should be a valid number (got '2')"),
    Case("cfg-eps-nan", "convert", set_key("config.json", "rms_norm_eps", float("nan"), 1e-5),
         "key 'rms_norm_eps': Input should be a finite number"),
    Case("cfg-tied-string", "convert", set_key("config.json", "tie_word_embeddings", "no", False),
         "key 'tie_word_embeddings': Input should be a valid boolean"),
    # an unsupported family is refused for that, not for its own keys; unknown keys are fine
    # (a family neither quantkit nor llama.cpp's converter knows: a known one takes the fallback)
    Case("cfg-unsupported-family", "convert", json_edit("config.json", lambda d, bad: {
        **d, "ffn_multipliers": [0.5, 4.0],
        **({"architectures": ["FancyELMForCausalLM"], "intermediate_size": [128, 256]} if bad else {})}),
         "architecture 'FancyELMForCausalLM' is not supported"),
    # --- tokenizer files -------------------------------------------------------------------------
    Case("tok-missing", "convert", _delete(K), "no tokenizer.json or tokenizer.model"),
    Case("tok-broken-json", "convert", _write(K, '{"model": {'), "tokenizer.json: not valid JSON"),
    Case("tok-model-list", "convert", set_key(K, "model", []),
         "key 'model': Input should be a valid dictionary"),
    Case("tok-added-id-string", "convert", json_edit(K, _tok_added_id),
         "key 'added_tokens[0].id': Input should be a valid integer"),
    Case("tok-merge-number", "convert", json_edit(K, _tok_merge),
         "key 'model.merges[0]': Input should be a valid string (got 5)"),
    Case("tok-vocab-id-string", "convert", json_edit(K, _tok_vocab), "key 'model.vocab."),
    Case("tcfg-broken-json", "convert", _write(TC, "{"), "tokenizer_config.json: not valid JSON"),
    Case("tcfg-chat-template-number", "convert", set_key(TC, "chat_template", 5, "{{ messages }}"),
         "key 'chat_template': Input should be a valid string (got 5)"),
    Case("tcfg-add-bos-string", "convert", set_key(TC, "add_bos_token", "yes", False),
         "key 'add_bos_token': Input should be a valid boolean (got 'yes')"),
    Case("tcfg-decoder-key", "convert", json_edit(TC, lambda d, bad: {
        **d, "added_tokens_decoder": {("abc" if bad else "500"): {"content": "<|x|>", "special": True}}}),
         "added_tokens_decoder key 'abc' is not a token id"),
    # --- GGUF ------------------------------------------------------------------------------------
    Case("gg-empty", "inspect", gguf_case(lambda bad: b"" if bad else gguf_blob()),
         "empty file, not a GGUF"),
    Case("gg-bad-magic", "inspect", gguf_case(lambda bad: gguf_blob(magic=b"GGUX" if bad else b"GGUF")),
         "not a GGUF file (bad magic)"),
    Case("gg-version", "inspect", gguf_case(lambda bad: gguf_blob(version=9 if bad else 2)),
         "unsupported GGUF version 9"),
    Case("gg-truncated-header", "inspect",
         gguf_case(lambda bad: gguf_blob()[:10] if bad else gguf_blob()), "tensor count needs 8 bytes, 2 left"),
    Case("gg-kv-count-huge", "inspect", gguf_case(lambda bad: gguf_blob(n_kv=2**60 if bad else None)),
         "metadata count 1152921504606846976 cannot fit in the file"),
    Case("gg-tensor-count-huge", "inspect",
         gguf_case(lambda bad: gguf_blob(n_tensors=2**60 if bad else None)),
         "tensor count 1152921504606846976 cannot fit in the file"),
    Case("gg-string-length-huge", "inspect", gguf_case(lambda bad: gguf_blob(
        kvs=[gs("general.name", 2**62 if bad else None) + struct.pack("<I", STRING) + gs("x")])),
         "metadata key #1 needs 4611686018427387904 bytes"),
    Case("gg-array-count-huge", "inspect", gguf_case(lambda bad: gguf_blob(kvs=[
        gs("tokenizer.ggml.scores") + struct.pack("<IIQ", ARRAY, F32_V, 2**61 if bad else 2)
        + struct.pack("<ff", 0.0, 1.0)])), "array of 2305843009213693952 items cannot fit"),
    Case("gg-value-type", "inspect", gguf_case(lambda bad: gguf_blob(
        kvs=[kv_u32("general.file_type", 0, 99 if bad else U32)])), "unknown value type 99"),
    Case("gg-nested-array", "inspect", gguf_case(lambda bad: gguf_blob(kvs=[
        gs("x.list") + struct.pack("<IIQ", ARRAY, ARRAY if bad else U32, 1) + struct.pack("<I", 0)])),
         "nested arrays are not supported"),
    Case("gg-duplicate-key", "inspect", gguf_case(lambda bad: gguf_blob(
        kvs=[kv_u32("x.a", 1), kv_u32("x.a" if bad else "x.b", 2)])), "metadata key 'x.a' repeated"),
    Case("gg-key-not-utf8", "inspect", gguf_case(lambda bad: gguf_blob(
        kvs=[gs(b"\xff\xfe" if bad else b"ok") + struct.pack("<II", U32, 1)])), "is not UTF-8"),
    Case("gg-n-dims-5", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("t", [8, 1, 1, 1, 1] if bad else [8, 1, 1, 1], 0, 0)])),
         "tensor 't' has 5 dimensions (1..4 allowed)"),
    Case("gg-n-dims-0", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("t", [] if bad else [8], 0, 0)])), "tensor 't' has 0 dimensions"),
    Case("gg-tensor-type", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("t", [8], 999 if bad else 0, 0)])), "tensor 't' has unknown type 999"),
    Case("gg-misaligned", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("a", [8], 0, 0), ("b", [8], 0, 36 if bad else 64)])),
         "tensor 'b' offset 36 is not 32-aligned"),
    Case("gg-alignment-not-pow2", "inspect", gguf_case(lambda bad: gguf_blob(
        kvs=[kv_u32("general.alignment", 24 if bad else 64)], alignment=24 if bad else 64)),
         "general.alignment 24 is not a power of two"),
    Case("gg-offset-past-eof", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("t", [8], 0, 2**40 if bad else 0)], data_bytes=32)), "runs past the end of the file"),
    Case("gg-truncated-data", "inspect", gguf_case(lambda bad: gguf_blob(
        data_bytes=150 if bad else None)), "tensor 'blk.0.attn_q.weight' data (68 bytes at"),
    Case("gg-block-mismatch", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("q", [33 if bad else 64, 1], 8, 0)])), "row of 33 is not a multiple of Q8_0's block of 32"),
    Case("gg-duplicate-tensor", "inspect", gguf_case(lambda bad: gguf_blob(
        tensors=[("a", [8], 0, 0), ("a" if bad else "b", [8], 0, 32)])), "tensor 'a' repeated"),
]  # fmt: skip


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("good") / "m", "LlamaForCausalLM", **SMALL)


def run_main(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, int]:
    """quantkit's CLI in this process: (exit code, stderr, peak traced bytes)."""
    from quantkit.cli import main

    capsys.readouterr()
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return code, capsys.readouterr().err, peak


def prepare(case: Case, good: Path, tmp: Path, bad: bool) -> tuple[list[str], Path]:
    """Make the case's input under ``tmp``; return the CLI arguments and the output path."""
    if case.kind == "convert":
        model = tmp / "model"
        shutil.copytree(good, model)
        case.edit(model, bad)
        out = tmp / "out" / "o.gguf"
        return ["convert", str(model), "--to", "gguf:F16", "-o", str(out)], out
    tmp.mkdir(parents=True)
    case.edit(tmp, bad)
    return ["inspect", str(tmp / "m.gguf"), "--json"], tmp / "out" / "none"


def test_corpus_size() -> None:
    assert len(CASES) >= 30 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_malformed(
    case: Case,
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUANTKIT_DEBUG", raising=False)
    argv, out = prepare(case, good, tmp_path / "bad", bad=True)
    code, err, peak = run_main(argv, capsys)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("quantkit: error: "), err
    assert case.expect in lines[0], lines[0]
    assert case.file in lines[0], f"the message does not name {case.file}: {lines[0]}"
    assert peak < MEMORY_BOUND, f"{peak / 2**20:.1f} MiB traced"
    assert not out.parent.exists() or not any(out.parent.iterdir()), "output written"
    inputs = {"model", "m.gguf"}
    assert {p.name for p in (tmp_path / "bad").iterdir()} <= inputs | {"out"}, "stray files"


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_valid_neighbour(
    case: Case,
    good: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("QUANTKIT_DEBUG", raising=False)
    argv, out = prepare(case, good, tmp_path / "ok", bad=False)
    code, err, _ = run_main(argv, capsys)
    assert code == 0, err
    if case.kind == "convert":
        assert out.read_bytes()[:4] == b"GGUF"


def _child_rss(argv: list[str]) -> tuple[int, str, int]:
    """Run the CLI in a fresh process: (exit code, stderr, peak RSS in bytes via wait4)."""
    env = {k: v for k, v in os.environ.items() if k != "QUANTKIT_DEBUG"}
    p = subprocess.Popen(
        [sys.executable, "-m", "quantkit.cli", *argv],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )
    err = p.stderr.read().decode()  # type: ignore[union-attr]
    _, status, usage = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    return p.returncode, err, usage.ru_maxrss * 1024


@pytest.mark.parametrize(
    "case_id", ["st-shape-overflow", "gg-array-count-huge", "gg-string-length-huge"]
)
def test_lying_lengths_cost_no_memory(case_id: str, good: Path, tmp_path: Path) -> None:
    """A header claiming exabytes costs what a valid file costs: peak RSS of the real process
    within 32 MiB of its valid neighbour's."""
    case = next(c for c in CASES if c.id == case_id)
    argv_ok, _ = prepare(case, good, tmp_path / "ok", bad=False)
    argv_bad, out = prepare(case, good, tmp_path / "bad", bad=True)
    code_ok, err_ok, rss_ok = _child_rss(argv_ok)
    code, err, rss = _child_rss(argv_bad)
    assert code_ok == 0, err_ok
    assert code == 2 and case.expect in err and len(err.strip().splitlines()) == 1, err
    assert rss < rss_ok + 32 * 2**20, (rss / 2**20, rss_ok / 2**20)
    assert not out.exists()
