"""Recipes with `adapter:` in the source: every target is made from the fine-tune
(base + PEFT LoRA), validated against base + adapter in transformers, and the manifests and
model cards say which base and which adapter (path and content hash) it came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

pytest.importorskip("peft")

from lora_helpers import VARIANTS, make_adapter, peft_logits  # noqa: E402

VALIDATION = {"data": "text.txt", "ctx": 64, "chunks": 2, "threads": 2, "pp": 16, "tg": 4}


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("runlora")
    base = make_tiny_model(d / "base", "LlamaForCausalLM")
    make_adapter(base, d / "my-finetune", **VARIANTS["rslora"])
    (d / "text.txt").write_text(TRAIN_TEXT * 3)
    return d


def _recipe(d: Path, name: str, targets: list[dict], adapter: str = "my-finetune") -> Path:
    body = {
        "name": name,
        "source": {"model": "base", "adapter": adapter},
        "calibration": {"data": "text.txt", "ctx": 64, "chunks": 2, "samples": 4},
        "validation": VALIDATION,
        "output": str(d / f"out-{name}"),
        "targets": targets,
    }
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


def _plan(recipe: Path) -> list[dict]:
    r = run_cli("run", str(recipe), "--plan", "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_finetune_recipe(work: Path) -> None:
    from quantkit.hashing import model_hash

    # vLLM targets (llm-compressor) load the same merged copy as the imatrix; one is left out
    # here for time (an llm-compressor start is ~45 s on the shared 2 cores)
    targets = [
        {"name": "f32", "type": "F32"},
        {"name": "q8", "type": "Q8_0", "imatrix": True, "validate": False},
    ]
    rec = _recipe(work, "ft", targets)
    kinds = [(s["kind"], s["target"]) for s in _plan(rec)]
    # torch-side steps (imatrix, llm-compressor) load a merged copy, made once
    assert kinds[0] == ("merge", None) and kinds.count(("merge", None)) == 1
    r = run_cli("run", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    out = work / "out-ft"
    base_sha, ad_sha = model_hash(work / "base"), model_hash(work / "my-finetune")
    for t in targets:
        m = json.loads((out / t["name"] / "manifest.json").read_text())
        p = m["provenance"]
        assert (p["source"], p["source_sha256"]) == ("base", base_sha)
        assert (p["adapter"], p["adapter_sha256"]) == ("my-finetune", ad_sha)
        assert m["artifact"].startswith("my-finetune-")  # named after the fine-tune
        card = (out / t["name"] / "README.md").read_text()
        assert f"adapter: `my-finetune` (PEFT LoRA, merged; files sha256 `{ad_sha}`)" in card
        assert f"base model: `base` (files sha256 `{base_sha}`)" in card
    # validated against the fine-tune: the merged F32 GGUF is it (the base alone is far off:
    # test_lora.py measures KLD > 0.1 for it), and the card says what the reference was
    f32 = json.loads((out / "f32" / "manifest.json").read_text())["validation"]
    print("KLD vs base+adapter: F32", f32["quality"]["kld_mean"])
    assert f32["quality"]["kld_mean"] < 1e-4 and f32["passed"]
    assert "+ the adapter" in (out / "f32" / "README.md").read_text()
    im = json.loads((out / "q8" / "manifest.json").read_text())["provenance"]
    assert im["calibration_sha256"] is not None
    # the merged HF copy is the fine-tune in transformers too
    merged = next((out / ".cache").glob("merged-*/my-finetune"))
    from transformers import AutoTokenizer

    toks = AutoTokenizer.from_pretrained(work / "base")(TRAIN_TEXT[:200])["input_ids"][:48]
    want = peft_logits(work / "base", work / "my-finetune", toks)
    got = _logits(merged, toks)
    assert float(np.max(np.abs(got - want))) < 1e-4

    # nothing changed: all reused; the adapter's files changed: every step is made again
    assert {s["action"] for s in _plan(rec)} == {"reuse"}
    extra = work / "my-finetune" / "README.md"
    extra.write_text("another revision\n")
    try:
        assert {s["action"] for s in _plan(rec)} == {"build"}
    finally:
        extra.unlink()


def _logits(model_dir: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return m(torch.tensor([tokens])).logits[0].numpy()


@pytest.mark.parametrize(
    ("prepare", "expect"),
    [
        (lambda d: None, "source.adapter: {d}/missing is not a PEFT adapter folder"),
        (
            lambda d: _dora(d / "my-finetune", d / "missing"),
            "adapter uses DoRA",
        ),
    ],
)
def test_bad_adapter_refused(work: Path, prepare, expect: str) -> None:
    missing = work / "missing"
    shutil.rmtree(missing, ignore_errors=True)
    prepare(work)
    rec = _recipe(work, "bad", [{"name": "q8", "type": "Q8_0"}], adapter="missing")
    r = run_cli("run", str(rec), "--plan")
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert expect.format(d=work) in err, err
    assert not (work / "out-bad").exists()


def _dora(src: Path, dst: Path) -> None:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "adapter_config.json").read_text())
    cfg["use_dora"] = True
    (dst / "adapter_config.json").write_text(json.dumps(cfg))
