"""Quality along the K-quant ladder on real models, measured in llama.cpp the llama-perplexity way.

Calibration text and evaluation text are disjoint: the first part of tinystories_train_head.txt
calibrates, a later part (stories260K) or wiki.test.raw (the embedded default) evaluates.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import fixture_path

LADDER = ["Q8_0", "Q6_K", "Q4_K_M", "Q3_K_M", "Q2_K"]


def _ppls(artifacts, text: str, ctx: int, chunks: int, reference: Path, kld: bool = True) -> dict:
    """file -> (PPL, mean KLD to ``reference`` or None)."""
    from quantkit.validate.quality import llama_tokens, score_files

    tokens, bos = llama_tokens(reference, text, n_ctx=ctx)
    res = score_files(
        [a.path for a in artifacts],
        tokens,
        n_ctx=ctx,
        n_chunks=chunks,
        bos=bos,
        reference=reference if kld else None,
        threads=2,
    )
    return {
        str(a.path): (
            res[str(a.path)].ppl()[0],
            res[str(a.path)].kld_stats()["mean"] if kld else None,
        )
        for a in artifacts
    }


def test_stories260k_ladder_and_imatrix(tmp_path: Path) -> None:
    from quantkit.convert import QuantSettings, convert

    model = fixture_path("models", "stories260K")
    text = fixture_path("tinystories", "tinystories_train_head.txt").read_text()
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:60_000])
    evaltext = text[100_000:160_000]

    plain = convert(model, ["F32", *LADDER, "IQ4_XS"], tmp_path / "plain").artifacts
    withim = convert(
        model,
        ["Q4_K_M", "IQ4_XS"],
        tmp_path / "im",
        quant=QuantSettings(calib=calib, calib_ctx=256),
    ).artifacts
    got = _ppls(plain + withim, evaltext, 256, 16, plain[0].path)
    by = {a.type: got[str(a.path)] for a in plain}
    ppl = [by[t][0] for t in LADDER]
    # widths of 64 make every K-quant fall back (Q6_K → Q8_0 everywhere), so ties are allowed
    assert all(a <= b for a, b in zip(ppl, ppl[1:], strict=False)), dict(
        zip(LADDER, ppl, strict=True)
    )
    assert ppl[0] < ppl[2] < ppl[3] < ppl[4], dict(zip(LADDER, ppl, strict=True))
    im = {a.type: got[str(a.path)] for a in withim}
    for t in ("Q4_K_M", "IQ4_XS"):
        assert im[t][1] < by[t][1], f"{t}: KLD with imatrix {im[t][1]:.5f} ≥ without {by[t][1]:.5f}"


def test_demo_ladder_strictly_rises(demo_model_dir: Path, tmp_path: Path) -> None:
    from quantkit.convert import convert

    wiki = fixture_path("wikitext-2-raw", "wiki.test.raw").read_text()[:60_000]
    arts = convert(demo_model_dir, ["F16", *LADDER], tmp_path).artifacts
    got = _ppls(arts, wiki, 512, 3, arts[0].path, kld=False)
    ppl = [got[str(a.path)][0] for a in arts]  # F16 first
    assert all(a < b for a, b in zip(ppl, ppl[1:], strict=False)), dict(
        zip(["F16", *LADDER], ppl, strict=True)
    )


@pytest.mark.parametrize("qtype", ["IQ2_XS"])
def test_imatrix_type_builds_only_with_imatrix(qtype: str, tmp_path: Path) -> None:
    from quantkit.convert import QuantSettings, convert
    from quantkit.errors import InputError

    model = fixture_path("models", "stories260K")
    with pytest.raises(InputError, match="need an importance matrix"):
        convert(model, [qtype], tmp_path / "a.gguf")
    calib = tmp_path / "c.txt"
    calib.write_text(fixture_path("tinystories", "tinystories_train_head.txt").read_text()[:20_000])
    res = convert(
        model, [qtype], tmp_path / "b.gguf", quant=QuantSettings(calib=calib, calib_ctx=128)
    )
    assert res.artifacts[0].path.is_file()
