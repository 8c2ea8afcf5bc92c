"""Every GGUF model convert writes is loaded by llama.cpp (vocab only) before it gets its name.

The Phi-3 name rule (llama.cpp requires <unk> <s> </s> <|endoftext|> when general.name contains
"phi3" or "phi-3") is refused in the preflight with the missing tokens and a name that works;
a file llama.cpp refuses for a reason quantkit does not know is refused by the load itself, with
llama.cpp's message, exit 2 and nothing at the output.
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import gguf_logits, make_tiny_model, run_cli

# Phi-3 needs n_head × head_dim == hidden_size; 64-wide rows take Q8_0 (blocks of 32)
SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
PHI3_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}


def _spm_without_unk_and_eot(out: Path) -> None:
    """A Phi-3-style SentencePiece tokenizer whose unknown piece is "[UNK]" and that has no
    <|endoftext|>: it lacks two of the four tokens llama.cpp's Phi-3 rule needs."""
    from test_convert_gemma_phi3 import _train_spm
    from transformers import LlamaTokenizer

    for f in out.glob("*token*"):
        f.unlink()
    _train_spm(
        out, add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="[UNK]"
    )
    LlamaTokenizer.from_pretrained(str(out), unk_token="[UNK]").save_pretrained(out)


# tokenizer -> the Phi-3 rule's tokens it lacks
PHI3_CASES = {
    "bpe": "<unk> <s> </s>",  # conftest's byte-level BPE: <|endoftext|> only
    "spm": "<unk> <|endoftext|>",
}


@pytest.fixture(scope="module", params=list(PHI3_CASES))
def tiny_phi3(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, str]:
    model = make_tiny_model(
        tmp_path_factory.mktemp(request.param) / "tiny-phi3", "Phi3ForCausalLM", **SMALL, **PHI3_IDS
    )
    if request.param == "spm":
        _spm_without_unk_and_eot(model)
    return model, PHI3_CASES[request.param]


def _one_line(stderr: str) -> str:
    """The error: one line (warnings about the input may precede it, labelled as such)."""
    lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
    lines = [ln for ln in lines if not ln.startswith("quantkit: warning: ")]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def _nothing_written(out: Path) -> None:
    leftovers = sorted(p.name for p in out.iterdir()) if out.exists() else []
    assert not leftovers, f"written despite the error: {leftovers}"


def test_phi3_name_without_its_tokens_is_refused(
    tiny_phi3: tuple[Path, str], tmp_path: Path
) -> None:
    model, missing = tiny_phi3
    out = tmp_path / "out"
    r = run_cli("convert", str(model), "--to", "gguf:F16", "--to", "gguf:Q8_0", "-o", str(out))
    assert r.returncode == 2, r.stderr
    msg = _one_line(r.stderr)
    assert "general.name 'tiny-phi3' contains 'phi3'" in msg, msg
    assert f"the vocabulary lacks {missing} " in msg, msg
    assert "--name 'tiny-phi'" in msg, msg  # the way out, spelled out
    _nothing_written(out)

    # the name the message proposes converts, and the file loads in full and runs
    r = run_cli("convert", str(model), "--to", "gguf:Q8_0", "-o", str(out), "--name", "tiny-phi")
    assert r.returncode == 0, r.stderr
    logits = gguf_logits(out / "tiny-phi-Q8_0.gguf", [1, 5, 9, 13])
    assert logits.shape[0] == 4


def test_phi3_name_rule_matches_llama_cpp() -> None:
    from quantkit.convert.loadcheck import name_rule_problem

    full = ["<unk>", "<s>", "</s>", "<|endoftext|>", "a"]
    assert name_rule_problem("Phi-3-mini-4k-instruct", full) is None
    p = name_rule_problem("Phi-3-mini-4k-instruct", ["<s>", "</s>", "a"])  # lowercased there
    assert p is not None and p.missing == ("<unk>", "<|endoftext|>")
    assert p.renamed() == "Phi-mini-4k-instruct"
    assert name_rule_problem("Phi-4-mini-instruct", ["a"]) is None
    # llama-vocab.cpp tests jina-v2 tokenizers and two BERT architectures first (the <mask> rule)
    assert name_rule_problem("phi3-embed", ["a"], pre="jina-v2-code") is None
    assert name_rule_problem("phi3-embed", ["a"], arch="jina-bert-v3") is None


def _cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """quantkit's CLI in this process (so a test can break one of its functions)."""
    from quantkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    return int(e.value.code or 0), capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("llama") / "m", "LlamaForCausalLM", **SMALL)


def test_writer_losing_the_merges_is_caught_by_the_load(
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A byte-level BPE vocabulary written without its merges: quantkit's preflight has nothing
    to say about it, llama.cpp's vocabulary loader refuses it."""
    import quantkit.convert.hf_to_gguf as h

    write_vocab = h.write_vocab
    monkeypatch.setattr(h, "write_vocab", lambda w, v: write_vocab(w, replace(v, merges=None)))
    out = tmp_path / "out"
    code, err = _cli(
        ["convert", str(tiny_llama), "--to", "gguf:F16", "--to", "gguf:Q8_0", "-o", str(out)],
        capsys,
    )
    assert code == 2, err
    msg = _one_line(err)
    assert "llama.cpp cannot load m-F16.gguf: " in msg, msg
    assert "error loading model vocabulary: cannot find tokenizer merges in model file" in msg, msg
    _nothing_written(out)


def test_broken_quantized_file_is_caught_by_the_load(
    tiny_llama: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A quantized file that comes out short (a full disk, a killed writer): llama.cpp names the
    first tensor past the end, and the F16 of the same run is not kept either."""
    import quantkit.convert.quantized as h

    quantize_file = h.quantize_file

    def short(src: Path, dst: Path | None, *a: Any, **kw: Any) -> Any:
        rep = quantize_file(src, dst, *a, **kw)
        if dst is not None:
            with open(dst, "r+b") as f:
                f.truncate(dst.stat().st_size - 4096)
        return rep

    monkeypatch.setattr(h, "quantize_file", short)
    out = tmp_path / "out"
    code, err = _cli(
        ["convert", str(tiny_llama), "--to", "gguf:F16", "--to", "gguf:Q8_0", "-o", str(out)],
        capsys,
    )
    assert code == 2, err
    msg = _one_line(err)
    assert "llama.cpp cannot load m-Q8_0.gguf: " in msg and "not within the file bounds" in msg, msg
    _nothing_written(out)


def test_gguf_input_with_a_phi3_name_is_refused_before_quantizing(
    tiny_phi3: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A float GGUF from elsewhere (here: quantkit with its checks switched off) named phi3
    without the tokens: its quantized types would not load either."""
    import quantkit.convert.hf_to_gguf as h
    from quantkit.convert import convert

    model, missing = tiny_phi3
    monkeypatch.setattr(h, "check_name_rules", lambda *a, **kw: None)
    monkeypatch.setattr(h, "check_loads", lambda *a, **kw: None)
    src = convert(model, ["F16"], tmp_path / "src").artifacts[0].path
    monkeypatch.undo()
    out = tmp_path / "out"
    r = run_cli("convert", str(src), "--to", "gguf:Q8_0", "-o", str(out))
    assert r.returncode == 2, r.stderr
    msg = _one_line(r.stderr)
    assert "tiny-phi3-F16.gguf: general.name 'tiny-phi3'" in msg, msg
    assert f"lacks {missing} " in msg, msg
    assert "convert the HF checkpoint again with --name 'tiny-phi'" in msg, msg
    _nothing_written(out)
    # a GGUF input keeps its own name: --name is for a conversion from the HF checkpoint
    r = run_cli("convert", str(src), "--to", "gguf:Q8_0", "-o", str(out), "--name", "tiny-phi")
    assert r.returncode == 2 and "a GGUF input keeps its own" in _one_line(r.stderr), r.stderr
    _nothing_written(out)
    shutil.rmtree(tmp_path / "src")
