"""Importance matrix: the statistic, the file format, and what it does to quantization.

References independent of quantize/gguf/imatrix.py:
- a direct torch computation of layer 0 (attention and MLP written out by hand);
- llama.cpp itself: its real graph evaluated through libllama with an eval callback that does
  what llama-imatrix's ``collect_imatrix`` does (same filter, same sum of squares of ``src1``);
- llama.cpp's own GGUF parser (libggml-base ``gguf_init_from_file``) reading our file, followed
  by the steps of ``common_imatrix_load`` and quantize.cpp's ``load_imatrix``;
- llama.cpp's own GGUF writer replaying imatrix.cpp's ``save_imatrix`` (byte-identical files);
- llama.cpp's quantizer: IQ2_XS (refused without an imatrix) accepts ours, and Q4_K_M / IQ4_XS
  get closer to F16 with it.
The llama-quantize binary is not built here; ``quantize_with_imatrix`` below passes the loaded
data through quantkit's quantize_file the way llama-quantize's main() passes it to libllama.
"""

from __future__ import annotations

import ctypes
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, fixture_path, make_tiny_model

from quantkit.errors import EngineError, InputError
from quantkit.quantize.gguf.imatrix import (
    Imatrix,
    bos_added,
    chunk_tokens,
    collect_imatrix,
    imatrix_gguf_bytes,
    load_imatrix,
    save_imatrix,
)
from quantkit.quantize.gguf.types import GGUFType, gguf_type

# -- llama.cpp helpers (ctypes) ------------------------------------------------------------------


def quantize_with_imatrix(
    src: Path,
    dst: Path,
    qtype: GGUFType,
    imatrix: dict[str, np.ndarray] | None,
    *,
    threads: int | None = None,
    imatrix_file: str | None = None,
    dataset: str | None = None,
    chunks: int = 0,
) -> None:
    """quantkit's quantize_file with an importance matrix, as llama-quantize passes one."""
    from quantkit.quantize.gguf.quantizer import QuantizeOptions, quantize_file

    opts = QuantizeOptions(
        threads=threads, imatrix=imatrix, imatrix_file=imatrix_file,
        imatrix_dataset=dataset, imatrix_chunks=chunks,
    )  # fmt: skip
    quantize_file(src, dst, qtype, opts)


class _GGMLTensor(ctypes.Structure):
    """struct ggml_tensor (ggml/include/ggml.h of the engine's llama.cpp)."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * 4),
        ("nb", ctypes.c_size_t * 4),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * 16),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * 10),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * 64),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


class _GGMLInitParams(ctypes.Structure):
    _fields_ = [
        ("mem_size", ctypes.c_size_t),
        ("mem_buffer", ctypes.c_void_p),
        ("no_alloc", ctypes.c_bool),
    ]


class _GGUFInitParams(ctypes.Structure):
    _fields_ = [("no_alloc", ctypes.c_bool), ("ctx", ctypes.POINTER(ctypes.c_void_p))]


def _ggml() -> ctypes.CDLL:
    """libggml-base of llama-cpp-python (the library libllama itself uses)."""
    from quantkit.quantize.gguf.libllama import llama_cpp

    llama_cpp()
    import llama_cpp as pkg

    base = ctypes.CDLL(str(Path(pkg.__file__).parent / "lib" / "libggml-base.so"))
    sigs = {
        "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
        "ggml_get_name": (ctypes.c_char_p, [ctypes.c_void_p]),
        "ggml_backend_buffer_is_host": (ctypes.c_bool, [ctypes.c_void_p]),
        "gguf_init_from_file": (ctypes.c_void_p, [ctypes.c_char_p, _GGUFInitParams]),
        "gguf_free": (None, [ctypes.c_void_p]),
        "ggml_free": (None, [ctypes.c_void_p]),
        "gguf_get_n_tensors": (ctypes.c_int64, [ctypes.c_void_p]),
        "gguf_find_key": (ctypes.c_int64, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_get_kv_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_type": (ctypes.c_int, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_n": (ctypes.c_size_t, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_arr_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_size_t]),
        "gguf_get_val_u32": (ctypes.c_uint32, [ctypes.c_void_p, ctypes.c_int64]),
        "gguf_get_val_str": (ctypes.c_char_p, [ctypes.c_void_p, ctypes.c_int64]),
        "ggml_get_first_tensor": (ctypes.c_void_p, [ctypes.c_void_p]),
        "ggml_get_next_tensor": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_void_p]),
        "ggml_nelements": (ctypes.c_int64, [ctypes.c_void_p]),
        "ggml_n_dims": (ctypes.c_int, [ctypes.c_void_p]),
        "ggml_get_data_f32": (ctypes.POINTER(ctypes.c_float), [ctypes.c_void_p]),
        "ggml_init": (ctypes.c_void_p, [_GGMLInitParams]),
        "ggml_tensor_overhead": (ctypes.c_size_t, []),
        "ggml_new_tensor_2d": (
            ctypes.c_void_p,
            [ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_int64],
        ),
        "ggml_set_name": (ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_char_p]),
        "gguf_init_empty": (ctypes.c_void_p, []),
        "gguf_set_val_str": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_char_p]),
        "gguf_set_arr_str": (
            None,
            [ctypes.c_void_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_char_p), ctypes.c_size_t],
        ),
        "gguf_set_val_u32": (None, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32]),
        "gguf_add_tensor": (None, [ctypes.c_void_p, ctypes.c_void_p]),
        "gguf_write_to_file": (ctypes.c_bool, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_bool]),
    }
    for fn, (res, args) in sigs.items():
        getattr(base, fn).restype = res
        getattr(base, fn).argtypes = args
    return base


GGUF_TYPE_UINT32, GGUF_TYPE_STRING, GGUF_TYPE_ARRAY = 4, 8, 9  # enum gguf_type (gguf.h)


def llamacpp_read_imatrix(path: Path) -> dict:
    """llama.cpp's loader on our file: gguf_init_from_file (C), then common_imatrix_load's steps
    (common/imatrix-loader.cpp) and quantize.cpp load_imatrix's normalisation, line by line."""
    g = _ggml()
    ggml_ctx = ctypes.c_void_p()
    gctx = g.gguf_init_from_file(
        str(path).encode(), _GGUFInitParams(False, ctypes.pointer(ggml_ctx))
    )
    assert gctx, "gguf_init_from_file refused the file"
    try:
        assert g.gguf_get_n_tensors(gctx) >= 1
        kt = g.gguf_find_key(gctx, b"general.type")
        assert kt != -1 and g.gguf_get_kv_type(gctx, kt) == GGUF_TYPE_STRING
        general_type = g.gguf_get_val_str(gctx, kt).decode()
        kd = g.gguf_find_key(gctx, b"imatrix.datasets")
        kc = g.gguf_find_key(gctx, b"imatrix.chunk_count")
        ks = g.gguf_find_key(gctx, b"imatrix.chunk_size")
        assert -1 not in (kd, kc, ks), "has_metadata is false: llama-quantize would refuse it"
        assert g.gguf_get_kv_type(gctx, kd) == GGUF_TYPE_ARRAY
        assert g.gguf_get_arr_type(gctx, kd) == GGUF_TYPE_STRING
        datasets = [
            g.gguf_get_arr_str(gctx, kd, i).decode() for i in range(g.gguf_get_arr_n(gctx, kd))
        ]
        # gguf_get_val_u32 aborts the process on another type: check before asking
        assert g.gguf_get_kv_type(gctx, kc) == GGUF_TYPE_UINT32
        assert g.gguf_get_kv_type(gctx, ks) == GGUF_TYPE_UINT32
        chunk_count, chunk_size = g.gguf_get_val_u32(gctx, kc), g.gguf_get_val_u32(gctx, ks)

        pairs: dict[str, list] = {}
        t = g.ggml_get_first_tensor(ggml_ctx)
        while t:
            name = g.ggml_get_name(t).decode()
            for suffix, slot in ((".in_sum2", 0), (".counts", 1)):
                if name.endswith(suffix):
                    pairs.setdefault(name[: -len(suffix)], [None, None])[slot] = t
            t = g.ggml_get_next_tensor(ggml_ctx, t)
        entries, dims, quant = {}, {}, {}
        for name, (ts, tc) in pairs.items():
            assert ts and tc, f"mismatched sums and counts for {name}"
            s, c = _GGMLTensor.from_address(ts), _GGMLTensor.from_address(tc)
            assert s.type == 0 and c.type == 0, "sums and counts must be F32"
            nval, ncounts = g.ggml_nelements(ts), g.ggml_nelements(tc)
            sums = np.ctypeslib.as_array(g.ggml_get_data_f32(ts), (nval,)).copy()
            counts = [
                int(math.floor(v + 0.5))  # std::lround (non-negative)
                for v in np.ctypeslib.as_array(g.ggml_get_data_f32(tc), (ncounts,))
            ]
            entries[name] = (sums, counts)
            dims[name] = ((list(s.ne), g.ggml_n_dims(ts)), (list(c.ne), g.ggml_n_dims(tc)))
            # quantize.cpp load_imatrix, GGUF path
            ne0 = nval // ncounts
            e = np.empty(nval, np.float32)
            for j in range(ncounts):
                cnt = np.float32(counts[j])
                e[j * ne0 : (j + 1) * ne0] = (
                    sums[j * ne0 : (j + 1) * ne0] / cnt if cnt > 0 else np.float32(1)
                )
            quant[name] = e
        return dict(
            general_type=general_type,
            datasets=datasets,
            chunk_count=chunk_count,
            chunk_size=chunk_size,
            entries=entries,
            dims=dims,
            quantizer=quant,
        )
    finally:
        g.gguf_free(gctx)
        g.ggml_free(ggml_ctx)


def llamacpp_write_imatrix(im: Imatrix, path: Path) -> None:
    """imatrix.cpp ``IMatrixCollector::save_imatrix`` replayed through llama.cpp's own gguf/ggml
    functions: same keys in the same order, names sorted, in_sum2 [n_cols, n_mats] and counts
    [1, n_mats] as F32, ``gguf_write_to_file``."""
    g = _ggml()
    size = 0
    for sums, counts in im.entries.values():
        for n in (len(sums), len(counts)):
            size += -(-(g.ggml_tensor_overhead() + 4 * n) // 16) * 16  # GGML_PAD(…, MEM_ALIGN)
    ctx = g.ggml_init(_GGMLInitParams(size, None, False))
    gctx = g.gguf_init_empty()
    try:
        g.gguf_set_val_str(gctx, b"general.type", b"imatrix")
        names = [d.encode() for d in ([im.dataset] if im.dataset else [])]
        g.gguf_set_arr_str(
            gctx, b"imatrix.datasets", (ctypes.c_char_p * len(names))(*names), len(names)
        )
        g.gguf_set_val_u32(gctx, b"imatrix.chunk_count", im.chunks)
        g.gguf_set_val_u32(gctx, b"imatrix.chunk_size", im.chunk_size)
        for name in sorted(im.entries):
            sums, counts = im.entries[name]
            nmat = len(counts)
            for suffix, ne0, data in (
                (".in_sum2", len(sums) // nmat, sums),
                (".counts", 1, counts),
            ):
                t = g.ggml_new_tensor_2d(ctx, 0, ne0, nmat)
                g.ggml_set_name(t, (name + suffix).encode())
                dst = np.ctypeslib.as_array(g.ggml_get_data_f32(t), (ne0 * nmat,))
                dst[:] = np.asarray(data, dtype=np.float32)
                g.gguf_add_tensor(gctx, t)
        assert g.gguf_write_to_file(gctx, str(path).encode(), False)
    finally:
        g.gguf_free(gctx)
        g.ggml_free(ctx)


def llamacpp_collect(gguf_path: Path, chunks: list[list[int]], threads: int = 2) -> dict:
    """llama-imatrix's statistic from llama.cpp's own graph (tools/imatrix/imatrix.cpp
    collect_imatrix, dense path): an eval callback asks for every MUL_MAT whose weight is blk.*
    with an F32 src1 of >= 16 rows, then adds Σ src1² per column and counts the rows. Every
    position is an output and each chunk starts from an empty cache, as in compute_imatrix.
    F32 KV cache and no flash attention so that the only difference left is float rounding."""
    from quantkit.quantize.gguf.libllama import llama_cpp

    lib, g = llama_cpp(), _ggml()
    stats: dict[str, list] = {}

    def weight_name(t: _GGMLTensor) -> str:
        name = t.name.decode()
        return name.split("#")[1] if "#" in name else name  # filter_tensor_name

    def collect(tp: int, ask: bool, _user: object) -> bool:
        t = _GGMLTensor.from_address(tp)
        op = g.ggml_op_name(t.op).decode()
        if op not in ("MUL_MAT", "MUL_MAT_ID"):
            return False
        assert op == "MUL_MAT", "no MoE in these models"
        src0, src1 = _GGMLTensor.from_address(t.src[0]), _GGMLTensor.from_address(t.src[1])
        if ask:
            return src1.ne[1] >= 16 and src1.type == 0 and weight_name(src0).startswith("blk.")
        assert g.ggml_get_name(t.src[0]) == src0.name, "struct ggml_tensor layout changed"
        assert g.ggml_backend_buffer_is_host(src1.buffer) and src1.nb[0] == 4
        assert src0.ne[2] * src0.ne[3] == 1
        ne, nb = list(src1.ne), list(src1.nb)
        span = sum((ne[i] - 1) * nb[i] for i in range(4)) + 4
        buf = (ctypes.c_char * span).from_address(src1.data)
        x = np.ndarray((ne[3], ne[2], ne[1], ne[0]), np.float32, buf, 0, tuple(nb[::-1]))
        e = stats.setdefault(weight_name(src0), [np.zeros(ne[0]), 0])
        e[0] += (x.astype(np.float64) ** 2).sum(axis=(0, 1, 2))
        e[1] += ne[1] * ne[2] * ne[3]
        return True

    callback = lib.ggml_backend_sched_eval_callback(collect)
    model = lib.llama_model_load_from_file(
        str(gguf_path).encode(), lib.llama_model_default_params()
    )
    assert model
    n = len(chunks[0])
    cp = lib.llama_context_default_params()
    cp.n_ctx = cp.n_batch = cp.n_ubatch = n
    cp.n_threads = cp.n_threads_batch = threads
    cp.type_k = cp.type_v = 0  # F32
    cp.flash_attn_type = 0  # LLAMA_FLASH_ATTN_TYPE_DISABLED
    cp.cb_eval = callback
    cp.cb_eval_user_data = None
    ctx = lib.llama_init_from_model(model, cp)
    batch = lib.llama_batch_init(n, 0, 1)
    try:
        assert ctx
        for chunk in chunks:
            lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
            for i, tok in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = tok, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, True
            batch.n_tokens = n
            assert lib.llama_decode(ctx, batch) == 0
    finally:
        lib.llama_batch_free(batch)
        if ctx:
            lib.llama_free(ctx)
        lib.llama_model_free(model)
    return stats


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("imx") / "llama", "LlamaForCausalLM")


@pytest.fixture(scope="module")
def tiny_f16(tiny: Path, tmp_path_factory) -> Path:
    from quantkit.convert import convert

    out = tmp_path_factory.mktemp("imx-f16") / "tiny-f16.gguf"
    convert(tiny, ["gguf:F16"], out)
    return out


def _chunks_for(model_dir: Path, text: str, ctx: int, n: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    bos = bos_added(tok)
    ids = tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)
    ids = ids["input_ids"]
    return chunk_tokens(([bos] if bos is not None else []) + ids, ctx, n, bos)


def _random_imatrix() -> Imatrix:
    rng = np.random.default_rng(0)
    dense = (rng.random(256, dtype=np.float32) * 100, np.array([192], dtype=np.int64))
    # a 3-D expert tensor: 4 experts × 64 columns, expert 2 never routed to
    moe = (rng.random(4 * 64, dtype=np.float32), np.array([10, 7, 0, 3], dtype=np.int64))
    moe[0][2 * 64 : 3 * 64] = 0
    return Imatrix(
        {"blk.0.attn_q.weight": dense, "blk.1.ffn_up_exps.weight": moe},
        chunks=3,
        dataset="tinystories_train_head.txt",
        chunk_size=64,
    )


# -- chunking ------------------------------------------------------------------------------------


def test_chunks_are_llama_imatrix_chunks() -> None:
    toks = list(range(100, 110))
    # BOS in front of the whole text, then every chunk's first token replaced by BOS
    assert chunk_tokens([1, *toks], 4, None, 1) == [[1, 100, 101, 102], [1, 104, 105, 106]]
    assert chunk_tokens(toks, 4, None, None) == [toks[0:4], toks[4:8]]
    assert chunk_tokens(toks, 4, 1, None) == [toks[0:4]]
    assert chunk_tokens(toks, 4, 99, None) == [toks[0:4], toks[4:8]]  # n_chunk = min(., max)
    assert chunk_tokens(toks, 11, None, None) == []


def test_bos_rule_matches_converter(tiny: Path) -> None:
    """Whether a chunk starts with BOS follows the vocabulary's add_bos as the converter writes it."""
    from transformers import AutoTokenizer

    from quantkit.convert.tokenizer import load_vocab

    for d in [tiny, fixture_path("models", "stories260K")]:
        tok = AutoTokenizer.from_pretrained(d)
        assert (bos_added(tok) is not None) == bool(load_vocab(d).add_bos), d.name
        if bos_added(tok) is not None:
            assert bos_added(tok) == tok.bos_token_id


# -- the statistic -------------------------------------------------------------------------------


def test_layer0_sums_match_direct_torch(tiny: Path) -> None:
    """Σ x² per input column of all seven layer-0 matrices, computed by hand from the weights."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    ctx, n = 64, 3
    im = collect_imatrix(tiny, TRAIN_TEXT, ctx=ctx, chunks=n, threads=2)
    assert im.chunks == n and im.chunk_size == ctx
    chunks = _chunks_for(tiny, TRAIN_TEXT, ctx, n)
    model = AutoModelForCausalLM.from_pretrained(
        tiny, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    cfg, layer = model.config, model.model.layers[0]
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    hd = cfg.hidden_size // nh
    W = {k: getattr(layer.self_attn, k).weight for k in ("q_proj", "k_proj", "v_proj", "o_proj")}
    W |= {k: getattr(layer.mlp, k).weight for k in ("gate_proj", "up_proj", "down_proj")}

    def rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + cfg.rms_norm_eps) * w

    want = {k: torch.zeros(0) for k in ("attn_in", "o_in", "ffn_in", "down_in")}
    with torch.no_grad():
        for chunk in chunks:
            ids = torch.tensor([chunk])
            out = model(ids, output_hidden_states=True)
            h0 = out.hidden_states[0][0]
            x = rms(h0, layer.input_layernorm.weight)
            q = (x @ W["q_proj"].T).view(ctx, nh, hd).transpose(0, 1)[None]
            k = (x @ W["k_proj"].T).view(ctx, nkv, hd).transpose(0, 1)[None]
            v = (x @ W["v_proj"].T).view(ctx, nkv, hd).transpose(0, 1)[None]
            cos, sin = model.model.rotary_emb(h0[None], torch.arange(ctx)[None])
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            k, v = k.repeat_interleave(nh // nkv, 1), v.repeat_interleave(nh // nkv, 1)
            scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
            scores = scores.masked_fill(torch.ones(ctx, ctx).triu(1).bool(), float("-inf"))
            o_in = (scores.softmax(-1) @ v)[0].transpose(0, 1).reshape(ctx, nh * hd)
            r = h0 + o_in @ W["o_proj"].T
            y = rms(r, layer.post_attention_layernorm.weight)
            down_in = torch.nn.functional.silu(y @ W["gate_proj"].T) * (y @ W["up_proj"].T)
            h1 = r + down_in @ W["down_proj"].T
            # the hand-written layer is the model's layer
            torch.testing.assert_close(h1, out.hidden_states[1][0], rtol=1e-4, atol=1e-4)
            for key, act in (("attn_in", x), ("o_in", o_in), ("ffn_in", y), ("down_in", down_in)):
                sq = (act.double() ** 2).sum(0)
                want[key] = sq if want[key].numel() == 0 else want[key] + sq
    names = {
        "attn_q": "attn_in",
        "attn_k": "attn_in",
        "attn_v": "attn_in",
        "attn_output": "o_in",
        "ffn_gate": "ffn_in",
        "ffn_up": "ffn_in",
        "ffn_down": "down_in",
    }
    for short, key in names.items():
        sums, counts = im.entries[f"blk.0.{short}.weight"]
        assert counts.tolist() == [n * ctx]
        np.testing.assert_allclose(sums, want[key].numpy(), rtol=2e-5, err_msg=short)


@pytest.mark.parametrize("case", ["llama", "qwen2", "stories260K"])
def test_statistic_matches_llama_cpp_graph(case: str, tmp_path: Path) -> None:
    """Same entries, counts and sums as llama-imatrix's callback on llama.cpp's graph of the GGUF.

    Llama: the Q/K rows are permuted in the GGUF (interleaved rotary), and the attn_q/attn_k
    input statistics still match; Qwen2: biases, no permutation; stories260K: a real model
    whose vocabulary adds BOS (so every chunk starts with it)."""
    from quantkit.convert import convert

    if case == "stories260K":
        model_dir = fixture_path("models", "stories260K")
    else:
        arch = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[case]
        model_dir = make_tiny_model(tmp_path / case, arch)
    text = TRAIN_TEXT
    gguf_path = tmp_path / "f32.gguf"
    convert(model_dir, ["gguf:F32"], gguf_path)
    im = collect_imatrix(model_dir, text, ctx=64, chunks=3, threads=2)
    chunks = _chunks_for(model_dir, text, 64, 3)
    if case == "stories260K":
        assert all(c[0] == 1 for c in chunks)  # BOS
    ref = llamacpp_collect(gguf_path, chunks)
    assert sorted(ref) == sorted(im.entries)  # same weights: blk.* matmuls, nothing else
    for name, (sums, counts) in im.entries.items():
        assert counts.tolist() == [ref[name][1]] == [3 * 64]
        r = ref[name][0]
        assert float(np.abs(sums - r).max() / r.max()) < 1e-4, name


def test_collect_rejects_bad_input(tiny: Path) -> None:
    with pytest.raises(InputError, match="less than one chunk"):
        collect_imatrix(tiny, "too short", ctx=64)
    with pytest.raises(InputError, match="too small"):
        collect_imatrix(tiny, TRAIN_TEXT, ctx=8)


# -- the file ------------------------------------------------------------------------------------


def test_round_trip_and_llama_cpp_parser(tmp_path: Path) -> None:
    im = _random_imatrix()
    path = tmp_path / "imatrix.gguf"
    save_imatrix(im, path)
    assert [p.name for p in tmp_path.iterdir()] == ["imatrix.gguf"]  # no temporary left
    back = load_imatrix(path)
    assert (back.chunks, back.chunk_size, back.dataset) == (3, 64, "tinystories_train_head.txt")
    assert back.entries.keys() == im.entries.keys()
    for name, (sums, counts) in im.entries.items():
        assert np.array_equal(back.entries[name][0], sums)
        assert back.entries[name][0].dtype == np.float32
        assert np.array_equal(back.entries[name][1], counts)

    c = llamacpp_read_imatrix(path)
    assert c["general_type"] == "imatrix"
    assert c["datasets"] == ["tinystories_train_head.txt"]
    assert (c["chunk_count"], c["chunk_size"]) == (3, 64)
    # shapes as imatrix.cpp creates them: in_sum2 [n_cols, n_mats], counts [1, n_mats]
    assert c["dims"]["blk.0.attn_q.weight"] == (([256, 1, 1, 1], 1), ([1, 1, 1, 1], 1))
    assert c["dims"]["blk.1.ffn_up_exps.weight"] == (([64, 4, 1, 1], 2), ([1, 4, 1, 1], 2))
    quant = im.to_quantizer()
    assert quant.keys() == c["quantizer"].keys() == c["entries"].keys()
    for name in quant:
        assert np.array_equal(c["entries"][name][0], im.entries[name][0])
        assert c["entries"][name][1] == im.entries[name][1].tolist()
        assert quant[name].dtype == np.float32
        assert np.array_equal(quant[name], c["quantizer"][name]), name
    moe = quant["blk.1.ffn_up_exps.weight"].reshape(4, 64)
    assert (moe[2] == 1).all()  # an expert nobody was routed to: 1.0, as quantize.cpp does
    np.testing.assert_array_equal(
        moe[0], im.entries["blk.1.ffn_up_exps.weight"][0][:64] / np.float32(10)
    )


def test_layout_matches_imatrix_cpp(tmp_path: Path) -> None:
    """Field by field with gguf-py's reader: keys, types and order, tensor order, shapes, F32."""
    import gguf

    im = _random_imatrix()
    path = tmp_path / "x.gguf"
    save_imatrix(im, path)
    r = gguf.GGUFReader(path)
    fields = [(f.name, [t.name for t in f.types]) for f in r.fields.values()]
    assert fields == [
        ("GGUF.version", ["UINT32"]),
        ("GGUF.tensor_count", ["UINT64"]),
        ("GGUF.kv_count", ["UINT64"]),
        ("general.type", ["STRING"]),
        ("imatrix.datasets", ["ARRAY", "STRING"]),
        ("imatrix.chunk_count", ["UINT32"]),
        ("imatrix.chunk_size", ["UINT32"]),
    ]
    assert r.fields["GGUF.version"].parts[-1][0] == 3
    assert [(t.name, t.shape.tolist(), t.tensor_type.name) for t in r.tensors] == [
        ("blk.0.attn_q.weight.in_sum2", [256], "F32"),
        ("blk.0.attn_q.weight.counts", [1], "F32"),
        ("blk.1.ffn_up_exps.weight.in_sum2", [64, 4], "F32"),
        ("blk.1.ffn_up_exps.weight.counts", [1, 4], "F32"),
    ]
    assert r.fields["general.type"].contents() == "imatrix"
    assert r.fields["imatrix.datasets"].contents() == ["tinystories_train_head.txt"]
    assert r.fields["imatrix.chunk_count"].contents() == 3
    assert r.fields["imatrix.chunk_size"].contents() == 64
    assert r.alignment == 32 and all(t.data_offset % 32 == 0 for t in r.tensors)
    # no dataset: an empty array, as llama.cpp writes when it had no prompt file
    im.dataset = ""
    save_imatrix(im, path)
    assert llamacpp_read_imatrix(path)["datasets"] == []
    assert load_imatrix(path).dataset == ""


@pytest.mark.parametrize("dataset", ["tinystories_train_head.txt", ""])
def test_bytes_equal_llama_cpp_writer(dataset: str, tmp_path: Path) -> None:
    """Our file is byte for byte the file llama.cpp's writer makes from the same data."""
    im = _random_imatrix()
    im.dataset = dataset
    ours, theirs = tmp_path / "ours.gguf", tmp_path / "theirs.gguf"
    save_imatrix(im, ours)
    llamacpp_write_imatrix(im, theirs)
    assert ours.read_bytes() == theirs.read_bytes()


def _legacy_dat(entries: list[tuple[str, int, np.ndarray]], last_chunk: int, dataset: str) -> bytes:
    """imatrix.cpp save_imatrix_legacy: n, then per entry name, ncall, nval, values; trailer."""
    out = struct.pack("<i", len(entries))
    for name, ncall, vals in entries:
        b = name.encode()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, len(vals))
        out += np.asarray(vals, "<f4").tobytes()
    return out + struct.pack("<ii", last_chunk, len(dataset)) + dataset.encode()


def test_legacy_dat_is_read(tmp_path: Path) -> None:
    vals = np.arange(1, 9, dtype=np.float32) * 4  # stored: mean × ncall, ncall = 4
    p = tmp_path / "old.dat"
    p.write_bytes(_legacy_dat([("blk.0.attn_q.weight", 4, vals)], 4, "wiki.train.raw"))
    im = load_imatrix(p)
    assert (im.chunks, im.dataset, im.chunk_size) == (4, "wiki.train.raw", 0)
    np.testing.assert_array_equal(im.to_quantizer()["blk.0.attn_q.weight"], vals / 4)


def _crafted(tmp: Path, tensors: dict[str, np.ndarray], *, metadata: bool = True) -> bytes:
    """A GGUF written by gguf-py with the given tensors (to make files our writer never makes)."""
    import gguf

    p = tmp / "crafted.gguf"
    w = gguf.GGUFWriter(p, "llama")
    w.add_string("general.type", "imatrix")
    if metadata:
        w.add_array("imatrix.datasets", ["x"])
        w.add_uint32("imatrix.chunk_count", 1)
        w.add_uint32("imatrix.chunk_size", 64)
    for name, arr in tensors.items():
        w.add_tensor(name, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return p.read_bytes()


SUMS, COUNT = np.ones(256, np.float32), np.full(1, 64, np.float32)
BAD = {
    "empty": lambda tmp: b"",
    "garbage": lambda tmp: b"NOPE" + b"\xff" * 60,
    "truncated": lambda tmp: imatrix_gguf_bytes(_random_imatrix())[:-100],
    "legacy, huge entry count": lambda tmp: struct.pack("<i", 2**31 - 1) + b"\0" * 40,
    "legacy, huge value count": lambda tmp: (
        struct.pack("<ii", 1, 1) + b"a" + struct.pack("<ii", 1, 2**30) + b"\0" * 64
    ),
    "no tensors": lambda tmp: _crafted(tmp, {}),
    "sums without counts": lambda tmp: _crafted(tmp, {"w.in_sum2": SUMS}),
    "F16 sums": lambda tmp: _crafted(
        tmp, {"w.in_sum2": SUMS.astype(np.float16), "w.counts": COUNT}
    ),
    "no metadata": lambda tmp: _crafted(
        tmp, {"w.in_sum2": SUMS, "w.counts": COUNT}, metadata=False
    ),
    "256 sums, 3 counts": lambda tmp: _crafted(
        tmp, {"w.in_sum2": SUMS, "w.counts": np.ones(3, np.float32)}
    ),
    "NaN sums": lambda tmp: _crafted(tmp, {"w.in_sum2": SUMS * np.nan, "w.counts": COUNT}),
    "negative count": lambda tmp: _crafted(tmp, {"w.in_sum2": SUMS, "w.counts": -COUNT}),
}


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_files_are_one_line_input_errors(case: str, tmp_path: Path) -> None:
    p = tmp_path / "bad.gguf"
    p.write_bytes(BAD[case](tmp_path))
    with pytest.raises(InputError) as e:
        load_imatrix(p)
    assert str(e.value) and "\n" not in str(e.value)


def test_crafted_good_file_loads(tmp_path: Path) -> None:
    """The crafting helper itself makes loadable files (so the failures above are the defects)."""
    p = tmp_path / "ok.gguf"
    p.write_bytes(_crafted(tmp_path, {"w.in_sum2": SUMS, "w.counts": COUNT}))
    im = load_imatrix(p)
    assert im.entries["w"][1].tolist() == [64] and im.chunk_size == 64


def test_save_refuses_what_llama_cpp_cannot_read(tmp_path: Path) -> None:
    im = _random_imatrix()
    im.entries["blk.0.attn_q.weight"] = (SUMS, np.ones(3, np.int64))
    with pytest.raises(InputError, match="matrices"):
        save_imatrix(im, tmp_path / "a.gguf")
    im = _random_imatrix()
    im.entries["blk.0." + "x" * 60 + ".weight"] = (SUMS, np.ones(1, np.int64))
    with pytest.raises(InputError, match="too long"):
        save_imatrix(im, tmp_path / "b.gguf")
    assert list(tmp_path.iterdir()) == []


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such imatrix"):
        load_imatrix(tmp_path / "nope.gguf")


# -- quantization with the imatrix ---------------------------------------------------------------


def test_iq2_xs_needs_and_accepts_our_imatrix(tiny: Path, tiny_f16: Path, tmp_path: Path) -> None:
    """IQ2_XS is refused without an imatrix; with ours (saved, re-read) it quantizes and runs."""
    from quantkit.quantize.gguf.reader import read_gguf
    from quantkit.validate.llamacpp import LlamaCppModel

    q = gguf_type("IQ2_XS")
    with pytest.raises(EngineError, match="imatrix"):
        quantize_with_imatrix(tiny_f16, tmp_path / "no.gguf", q, None, threads=2)

    im = collect_imatrix(tiny, TRAIN_TEXT, ctx=64, chunks=4, threads=2, dataset="train_text")
    path = tmp_path / "tiny.imatrix.gguf"
    save_imatrix(im, path)
    llamacpp_write_imatrix(im, tmp_path / "theirs.gguf")
    assert path.read_bytes() == (tmp_path / "theirs.gguf").read_bytes()
    back = load_imatrix(path)
    theirs = llamacpp_read_imatrix(path)["quantizer"]
    assert all(np.array_equal(v, theirs[k]) for k, v in back.to_quantizer().items())
    out = tmp_path / "tiny-iq2_xs.gguf"
    quantize_with_imatrix(
        tiny_f16, out, q, back.to_quantizer(), threads=2,
        imatrix_file=str(path), dataset=back.dataset, chunks=back.chunks,
    )  # fmt: skip
    info = read_gguf(out)
    assert info.type_histogram().get("IQ2_XS", 0) >= 8
    assert info.metadata["quantize.imatrix.dataset"] == "train_text"
    assert info.metadata["quantize.imatrix.entries_count"] == len(im.entries) == 14
    assert info.metadata["quantize.imatrix.chunks_count"] == 4
    m = LlamaCppModel(out, n_ctx=64, threads=2)
    try:
        text, _ = m.generate("Once upon a time", n=8)
        assert m.llm.n_tokens > len(m.tokenize("Once upon a time"))
        assert isinstance(text, str)
    finally:
        m.close()


@pytest.fixture(scope="module")
def smol(demo_model_dir: Path, tmp_path_factory) -> dict:
    """SmolLM2-135M: F16 GGUF, an imatrix from TinyStories (4 chunks of 256 tokens), and F16
    log-probabilities on 2 chunks of 256 tokens of wikitext-2 test (second halves scored)."""
    from quantkit.convert import convert
    from quantkit.validate.metrics import log_softmax

    calib = fixture_path("tinystories", "tinystories_train_head.txt").read_text()
    wiki = fixture_path("wikitext-2-raw", "wiki.test.raw").read_text()[:100_000]
    im = collect_imatrix(demo_model_dir, calib, ctx=256, chunks=4, threads=2)
    assert len(im.entries) == 30 * 7
    f16 = tmp_path_factory.mktemp("smol") / "f16.gguf"
    convert(demo_model_dir, ["gguf:F16"], f16)
    ctx = 256
    chunks = _chunks_for(demo_model_dir, wiki, ctx, 2)
    s = dict(f16=f16, quant=im.to_quantizer(), chunks=chunks, ctx=ctx, first=ctx // 2)
    s["ref"] = [log_softmax(lg) for lg in _scored_logits(s, f16)]
    return s


def _scored_logits(s: dict, path: Path) -> list[np.ndarray]:
    from quantkit.validate.llamacpp import LlamaCppModel

    m = LlamaCppModel(path, n_ctx=s["ctx"], threads=2)
    try:
        return [m.logits(c)[s["first"] : -1] for c in s["chunks"]]
    finally:
        m.close()


@pytest.mark.parametrize("qtype", ["Q4_K_M", "IQ4_XS"])
def test_imatrix_lowers_kld_on_other_text(smol: dict, qtype: str, tmp_path: Path) -> None:
    """Mean KLD to F16 on wikitext with the TinyStories imatrix is clearly below the KLD without
    it. (IQ4_XS is the slow case: SmolLM2's 576-wide rows fall back to IQ4_NL, ~25 s a file.)"""
    from quantkit.validate.metrics import Accumulator

    kld = {}
    for use in (False, True):
        out = tmp_path / f"{qtype}-{use}.gguf"
        quantize_with_imatrix(
            smol["f16"], out, gguf_type(qtype), smol["quant"] if use else None, threads=2
        )
        acc = Accumulator()
        for c, lg, r in zip(smol["chunks"], _scored_logits(smol, out), smol["ref"], strict=True):
            acc.add(lg, np.asarray(c[smol["first"] + 1 :]), r)
        kld[use] = float(np.mean(acc.kld))
        out.unlink()
    print(f"{qtype}: mean KLD to F16 without imatrix {kld[False]:.5f}, with {kld[True]:.5f}")
    assert kld[True] < 0.9 * kld[False], kld


# -- layer by layer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "dtype"),
    [
        ("LlamaForCausalLM", "bfloat16"),  # widened one layer at a time
        ("Qwen2ForCausalLM", "float32"),  # already float32: nothing to widen
        ("Gemma3ForCausalLM", "bfloat16"),  # scaled embedding, sliding-window layers
    ],
)
def test_layer_by_layer_equals_whole_model(arch: str, dtype: str, tmp_path: Path) -> None:
    """The collector that holds one decoder layer in float32 gives the statistic of the whole
    model loaded in float32 (tests/imatrix_reference.py), to 1e-4 relative per tensor."""
    from imatrix_reference import collect_whole_model

    model_dir = make_tiny_model(tmp_path / "m", arch, dtype=dtype)
    seen: list[tuple[str, int, int]] = []
    im = collect_imatrix(
        model_dir, TRAIN_TEXT, ctx=64, chunks=3, progress=lambda *a: seen.append(a)
    )
    ref = collect_whole_model(model_dir, TRAIN_TEXT, ctx=64, chunks=3)
    assert sorted(im.entries) == sorted(ref.entries)
    for name, (sums, counts) in im.entries.items():
        rsums, rcounts = ref.entries[name]
        assert counts.tolist() == rcounts.tolist(), name
        assert float(np.abs(sums - rsums).max() / np.abs(rsums).max()) <= 1e-4, name
    n_layer = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    assert seen[0] == ("imatrix layers", 0, n_layer) and seen[-1][1:] == (n_layer, n_layer)
