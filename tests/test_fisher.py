"""Fisher weights of the gguf:auto sensitivity: the layer-at-a-time decoder is the model, and
½ Σ F ΔW² predicts the KLD that an error ΔW causes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import make_tiny_model

torch = pytest.importorskip("torch")

from quantkit.checkpoint import Checkpoint  # noqa: E402
from quantkit.quantize.gguf.auto.fisher import _Runner, fisher_rows, supported  # noqa: E402

CTX, FIRST = 64, 32


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("fisher") / "tiny", "LlamaForCausalLM")


def _chunks(n: int = 3) -> list[list[int]]:
    rng = np.random.default_rng(1)
    return rng.integers(0, 512, (n, CTX)).tolist()


def _full(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="sdpa"
    ).eval()


def test_layer_at_a_time_matches_the_whole_model(tiny: Path) -> None:
    """Embedding, rotary, causal layers, norm and head, one layer in memory at a time, give the
    whole transformers model's logits (a missing causal mask or rotary would not)."""
    ids = torch.tensor(_chunks(2))
    r = _Runner(Checkpoint.open(tiny), torch.float32)
    with torch.no_grad():
        h = r.embed(ids)
        pos = torch.arange(CTX)[None].expand(2, -1)
        rope = r.rope(h, pos)
        for i in range(r.n_layers):
            h = r.layer(i, h, rope, pos)
        ours = r.model.lm_head(r.model.model.norm(h))
        ref = _full(tiny)(ids).logits
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4)


def _kld(model, ids, ref_lp) -> float:
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[:, FIRST:-1].double(), -1)
    return float((ref_lp.exp() * (ref_lp - lp)).sum(-1).mean())


def _noise_kld(model, w, hf_rows: np.ndarray, sigma: float, ids, draws: int = 6) -> float:
    """Mean KLD in transformers with independent N(0, σ²) noise on ``hf_rows`` of ``w``."""
    with torch.no_grad():
        ref_lp = torch.log_softmax(model(ids).logits[:, FIRST:-1].double(), -1)
    gen = torch.Generator().manual_seed(0)
    base = w.detach().clone()
    klds = []
    try:
        for _ in range(draws):
            noise = torch.zeros_like(base)
            shape = (len(hf_rows), w.shape[1])
            noise[torch.as_tensor(hf_rows)] = sigma * torch.randn(shape, generator=gen)
            with torch.no_grad():
                w.copy_(base + noise)
            klds.append(_kld(model, ids, ref_lp))
    finally:
        with torch.no_grad():
            w.copy_(base)
    return float(np.mean(klds))


def _setup(tiny: Path, gguf_name: str, hf_name: str, rows: np.ndarray | None):
    ckpt = Checkpoint.open(tiny)
    chunks = _chunks()
    model = _full(tiny)
    w = dict(model.named_parameters())[hf_name]
    rows = np.arange(w.shape[0]) if rows is None else rows
    f = fisher_rows(ckpt, chunks, {gguf_name: rows}, first=FIRST, samples=32, threads=2)[gguf_name]
    assert f.shape == (len(rows), w.shape[1])
    from quantkit.convert.archs.base import resolve

    perm = resolve(ckpt.config).transform(hf_name, np.arange(w.shape[0]))  # GGUF r = HF perm[r]
    return model, w, f, perm, torch.tensor(chunks)


def test_fisher_predicts_the_kld_of_weight_noise(tiny: Path) -> None:
    """For independent noise of variance σ² on some rows of a Linear, the mean KLD measured in
    transformers is σ² Σ_rows F (F holds the ½): within 25 %."""
    rows = np.arange(0, 256, 3)
    model, w, f, perm, ids = _setup(
        tiny, "blk.0.ffn_down.weight", "model.layers.0.mlp.down_proj.weight", rows
    )
    sigma = 0.02 * float(w.detach().std())
    measured = _noise_kld(model, w, perm[rows], sigma, ids)
    assert 0.75 < sigma**2 * float(f.sum()) / measured < 1.25


def test_fisher_rows_follow_the_rotary_permutation(tiny: Path) -> None:
    """The Q rows that F says matter most and least (4× apart on this model), each perturbed
    alone in HF's row order: the KLD follows F's prediction for both. Rows read without
    llama.cpp's Q/K permutation would swap in unrelated rows and miss one or the other."""
    model, w, f, perm, ids = _setup(
        tiny, "blk.1.attn_q.weight", "model.layers.1.self_attn.q_proj.weight", None
    )
    per_row = f.sum(axis=1)
    hi, lo = int(per_row.argmax()), int(per_row.argmin())
    assert per_row[hi] > 2.5 * per_row[lo]
    sigma = 0.1 * float(w.detach().std())
    for r in (hi, lo):
        measured = _noise_kld(model, w, perm[[r]], sigma, ids)
        assert 0.75 < sigma**2 * per_row[r] / measured < 1.25, r


def test_supported_families(tiny: Path) -> None:
    assert supported(Checkpoint.open(tiny))
    assert not supported(None)


def test_convert_from_hf_weighs_errors_by_fisher(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    """gguf:auto made from an HF checkpoint with --calib: the pass is Fisher-weighted, probes one
    kind at a time (no layer probes), and keeps the imatrix-weighted errors as a second
    surrogate; from a GGUF base (no checkpoint) it stays imatrix-weighted with layer probes."""
    from conftest import TRAIN_TEXT

    from quantkit.convert import QuantSettings, convert

    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT * 3)
    qs = QuantSettings(calib=calib, calib_ctx=64)
    target = "gguf:auto:bpw=5"
    art = convert(tiny, [target], tmp_path / "hf", quant=qs, dry_run=True).artifacts[0]
    sens = art.auto["sensitivity"]
    assert sens["weighting"] == "fisher"
    assert sens["probe_kld"] and all(k.startswith("kind:") for k in sens["probe_kld"])
    assert not sens["layer_gains"]
    assert "fisher" in sens["seconds"]
    f16 = convert(tiny, ["gguf:F16"], tmp_path / "f16").artifacts[0].path
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix

    save_imatrix(collect_imatrix(tiny, calib.read_text(), ctx=64, threads=2), tmp_path / "im.gguf")
    qs_im = QuantSettings(calib=calib, calib_ctx=64, imatrix_file=tmp_path / "im.gguf")
    art2 = convert(f16, [target], tmp_path / "gguf", quant=qs_im, dry_run=True).artifacts[0]
    assert art2.auto["sensitivity"]["weighting"] == "imatrix"
    assert art2.auto["sensitivity"]["layer_gains"]
