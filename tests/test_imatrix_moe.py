"""MoE importance matrix: per-expert sums and token counts equal llama-imatrix's statistic on
llama.cpp's own graph (MUL_MAT_ID), experts calibration never reaches are reported and kept with
count 0 (what llama.cpp's quantizer accepts), and an IQ4_XS Mixtral made with it loads."""

from __future__ import annotations

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, fixture_path, run_cli
from moe_models import make_tiny_moe
from test_imatrix import _chunks_for, _ggml, _GGMLTensor

from quantkit.quantize.gguf.imatrix import collect_imatrix

N_EXPERT = 6
NEVER = 5  # the expert no token can reach (see never_routed_model)


def never_routed_model(out: Path, **overrides) -> Path:
    """A tiny Mixtral whose router can never pick expert 5: rows 0/1 are a/-a and rows 2/3 are
    b/-b, so for every token two logits are >= 0 (|a·x| and |b·x|) and beat expert 5's row of
    zeros in the top-2 (a tie needs a·x = 0 exactly)."""
    import torch
    from safetensors.torch import load_file, save_file

    model = make_tiny_moe(out, "MixtralForCausalLM", num_local_experts=N_EXPERT,
                          num_experts_per_tok=2, **overrides)  # fmt: skip
    path = model / "model.safetensors"
    w = load_file(path)
    for name in [n for n in w if n.endswith("block_sparse_moe.gate.weight")]:
        g = w[name].clone()
        g[1], g[3], g[NEVER] = -g[0], -g[2], torch.zeros_like(g[0])
        w[name] = g
    save_file(w, path, metadata={"format": "pt"})
    return model


def llamacpp_collect_moe(gguf_path: Path, chunks: list[list[int]], threads: int = 2) -> dict:
    """llama-imatrix's statistic from llama.cpp's graph, MUL_MAT and MUL_MAT_ID
    (tools/imatrix/imatrix.cpp collect_imatrix): for MUL_MAT_ID, ids [n_used, n_tokens] and
    src1 [cols, n_used or 1, n_tokens]; each (slot, token) adds its row to expert ids[slot, token]
    and counts one token for it."""
    from quantkit.quantize.gguf.libllama import llama_cpp

    lib, g = llama_cpp(), _ggml()
    stats: dict[str, list] = {}

    def weight_name(t: _GGMLTensor) -> str:
        name = t.name.decode()
        return name.split("#")[1] if "#" in name else name

    def view(t: _GGMLTensor, dtype: type) -> np.ndarray:
        ne, nb = list(t.ne), list(t.nb)
        span = sum((ne[i] - 1) * nb[i] for i in range(4)) + np.dtype(dtype).itemsize
        buf = (ctypes.c_char * span).from_address(t.data)
        return np.ndarray((ne[3], ne[2], ne[1], ne[0]), dtype, buf, 0, tuple(nb[::-1]))

    def collect(tp: int, ask: bool, _user: object) -> bool:
        t = _GGMLTensor.from_address(tp)
        op = g.ggml_op_name(t.op).decode()
        if op not in ("MUL_MAT", "MUL_MAT_ID"):
            return False
        src0, src1 = _GGMLTensor.from_address(t.src[0]), _GGMLTensor.from_address(t.src[1])
        if ask:
            return src1.ne[1] >= 16 or op == "MUL_MAT_ID" and src1.ne[2] >= 16
        if not (src1.type == 0 and weight_name(src0).startswith("blk.")):
            return True
        assert g.ggml_backend_buffer_is_host(src1.buffer) and src1.nb[0] == 4
        x = view(src1, np.float32).astype(np.float64)[0]  # [n_tokens|ne2, ne1, cols]
        name = weight_name(src0)
        if op == "MUL_MAT":
            if src1.ne[1] < 16:
                return True
            e = stats.setdefault(name, [np.zeros((1, src1.ne[0])), np.zeros(1, np.int64)])
            e[0][0] += (x**2).sum(axis=(0, 1))
            e[1][0] += src1.ne[1] * src1.ne[2]
            return True
        ids_t = _GGMLTensor.from_address(t.src[2])
        ids = view(ids_t, np.int32)[0, 0]  # [n_tokens, n_used]
        n_as = src0.ne[2]
        e = stats.setdefault(name, [np.zeros((n_as, src1.ne[0])), np.zeros(n_as, np.int64)])
        for tok in range(ids.shape[0]):
            for slot in range(ids.shape[1]):
                ex = int(ids[tok, slot])
                e[0][ex] += x[tok, slot % src1.ne[1]] ** 2
                e[1][ex] += 1
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
    cp.flash_attn_type = 0
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


@pytest.fixture(scope="module")
def moe(tmp_path_factory) -> Path:
    # intermediate 384: ffn_down_exps rows (ne0 = 384) are not a multiple of 256, so IQ4_XS
    # falls back there and the audit must name the expert tensors
    return never_routed_model(tmp_path_factory.mktemp("imx-moe") / "mixtral", intermediate_size=384)


def test_moe_statistic_matches_llama_cpp_graph(moe: Path, tmp_path: Path) -> None:
    from quantkit.convert import convert

    gguf_path = tmp_path / "f32.gguf"
    convert(moe, ["gguf:F32"], gguf_path)
    im = collect_imatrix(moe, TRAIN_TEXT, ctx=64, chunks=3, threads=2)
    ref = llamacpp_collect_moe(gguf_path, _chunks_for(moe, TRAIN_TEXT, 64, 3))
    assert sorted(ref) == sorted(im.entries)
    assert {n for n in im.entries if "_exps" in n} == {
        f"blk.{b}.ffn_{p}_exps.weight" for b in range(2) for p in ("gate", "up", "down")
    }
    for name, (sums, counts) in im.entries.items():
        rsums, rcounts = ref[name]
        assert counts.tolist() == rcounts.tolist(), name  # same routing, token for token
        r = rsums.reshape(-1)
        assert float(np.abs(sums - r).max() / r.max()) < 1e-4, name
    cov = im.expert_coverage()
    assert set(cov) == {n for n in im.entries if "_exps" in n}
    for counts in cov.values():
        assert len(counts) == N_EXPERT and sum(counts) == 3 * 64 * 2  # 2 experts per token
        assert counts[NEVER] == 0 and all(c > 0 for i, c in enumerate(counts) if i != NEVER)
    assert im.unrouted() == {n: [NEVER] for n in cov}
    q = im.to_quantizer()["blk.0.ffn_down_exps.weight"].reshape(N_EXPERT, -1)
    assert (q[NEVER] == 1.0).all()  # quantize.cpp load_imatrix: uniform importance


def test_iq4_xs_with_calibration_lists_coverage_and_loads(moe: Path, tmp_path: Path) -> None:
    calib = fixture_path("tinystories", "tinystories_train_head.txt")
    head = tmp_path / "calib.txt"
    head.write_bytes(calib.read_bytes()[:6000])  # a few chunks are enough for a tiny model
    out = tmp_path / "m-IQ4_XS.gguf"
    r = run_cli("convert", str(moe), "--to", "gguf:IQ4_XS", "--calib", str(head),
                "--ctx", "128", "--chunks", "2", "-o", str(out), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    cov = res["imatrix"]["expert_coverage"]
    assert len(cov) == 6 and all(len(c) == N_EXPERT for c in cov.values())
    assert res["imatrix"]["unrouted_experts"] == {n: [NEVER] for n in cov}
    assert "saw no calibration token" in r.stderr
    audit = res["artifacts"][0]["audit"]
    fell = {f["tensor"] for f in audit["fallbacks"]}
    assert {"blk.0.ffn_down_exps.weight", "blk.1.ffn_down_exps.weight"} <= fell
    assert audit["type_histogram"].get("IQ4_XS", 0) >= 4  # gate/up experts got the type

    from quantkit.validate.llamacpp import LlamaCppModel

    m = LlamaCppModel(out, n_ctx=128, threads=2)
    try:
        m.generate("Once upon a time", 8)
        assert m.llm.n_tokens > len(m.tokenize("Once upon a time"))
    finally:
        m.close()
    # the human table, in-process (a second fresh process would import torch again)
    from click.testing import CliRunner

    from quantkit.cli import cli

    human = CliRunner().invoke(cli, ["imatrix", str(moe), "--calib", str(head), "--ctx", "128",
                                     "--chunks", "1", "-o", str(tmp_path / "im.gguf")])  # fmt: skip
    assert human.exit_code == 0, human.output
    assert "tokens per expert" in human.output and "never routed" in human.output


def test_moe_layer_by_layer_equals_whole_model(moe: Path) -> None:
    """Experts, router and routing counts: the one-layer-at-a-time collector equals the whole
    model in float32 (tests/imatrix_reference.py)."""
    from imatrix_reference import collect_whole_model

    im = collect_imatrix(moe, TRAIN_TEXT, ctx=64, chunks=3, threads=2)
    ref = collect_whole_model(moe, TRAIN_TEXT, ctx=64, chunks=3)
    assert sorted(im.entries) == sorted(ref.entries)
    for name, (sums, counts) in im.entries.items():
        rsums, rcounts = ref.entries[name]
        assert counts.tolist() == rcounts.tolist(), name
        assert float(np.abs(sums - rsums).max() / np.abs(rsums).max()) <= 1e-4, name
