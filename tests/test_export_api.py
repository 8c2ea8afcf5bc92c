"""quantkit.export: the docs example runs as written, and a PEFT model in memory exports the same
bytes as the CLI on the saved base and adapter."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, make_tiny_model, run_cli

pytest.importorskip("peft")

from lora_helpers import VARIANTS, make_adapter  # noqa: E402


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    base = make_tiny_model(root / "my-base", "LlamaForCausalLM")
    adapter = make_adapter(base, root / "my-adapter", **VARIANTS["rslora"])
    return root, base, adapter


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_docs_example_runs_as_written(saved, monkeypatch, capsys):
    from transformers import AutoTokenizer

    root, base, adapter = saved
    AutoTokenizer.from_pretrained(base).save_pretrained(adapter)  # the fine-tune's tokenizer
    doc = (REPO / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", doc, re.S).group(1)
    monkeypatch.chdir(root)
    exec(compile(code, "docs/api.md", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert [ln.split()[0] for ln in lines] == ["F16", "Q8_0"]
    for ln in lines:
        kind, size, sha, path = ln.split()
        assert Path(path).stat().st_size == int(size)
        assert _sha(Path(path)).startswith(sha)


def test_in_memory_peft_writes_cli_bytes(saved):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantkit

    root, base, adapter = saved
    cli_out = root / "cli"
    r = run_cli("convert", str(base), "--adapter", str(adapter),
                "--to", "gguf:F32", "--to", "gguf:Q8_0", "--to", "gguf-lora", "-o", str(cli_out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    res = quantkit.export(
        model, ["gguf:F32", "gguf:Q8_0", "gguf-lora"], root / "api",
        tokenizer=AutoTokenizer.from_pretrained(base), name="my-adapter", threads=2,
    )  # fmt: skip
    assert [a.label for a in res.artifacts] == ["F32", "Q8_0", "gguf-lora"]
    for a in res.artifacts:
        twin = cli_out / a.path.name
        assert a.sha256 == _sha(twin) == _sha(a.path), a.path.name
        assert a.size == twin.stat().st_size
    assert res.artifacts[2].format == "gguf-lora"
    assert json.dumps(res.to_json())


def test_bad_options_refused(saved):
    import quantkit
    from quantkit.errors import InputError

    root, base, _ = saved
    with pytest.raises(InputError, match="unknown option"):
        quantkit.export(str(base), "gguf:F16", root / "x", colour="red")
    assert not (root / "x").exists()


PEAK = """
import sys, torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer
import quantkit, quantkit.convert, quantkit.validate.harness, gguf  # imports before the baseline
base, adapter, out = sys.argv[1:4]
model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter)
tok = AutoTokenizer.from_pretrained(base)
def rss():
    for ln in open("/proc/self/status"):
        if ln.startswith("VmRSS"):
            return int(ln.split()[1]) * 1024
for p in model.parameters():  # weights may be memory-mapped: make the whole model resident
    float(p.sum())
before = rss()
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM: loading peaked above `before`
    f.write("5")
quantkit.export(model, ["gguf:F32"], out, tokenizer=tok, name="m")
peak = 0
for ln in open("/proc/self/status"):
    if ln.startswith("VmHWM"):
        peak = int(ln.split()[1]) * 1024
largest = max(p.numel() * 4 for p in model.parameters())
print(before, peak, largest)
"""


def test_in_memory_export_peak_rss(tmp_path):
    """Peak RSS of an in-memory export stays within the loaded model plus a few of its largest
    tensors (the merge holds W, B·A and the merged copy of one tensor at a time)."""
    base = make_tiny_model(
        tmp_path / "b", "LlamaForCausalLM", hidden_size=512, intermediate_size=2048,
        num_hidden_layers=6, vocab_size=4096,
    )  # fmt: skip
    adapter = make_adapter(base, tmp_path / "a", r=8, lora_alpha=16)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(base), str(adapter), str(tmp_path / "o")],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    before, peak, largest = map(int, r.stdout.split()[-3:])
    grew = peak - before
    print(f"in-memory export: RSS {before / 2**20:.0f} MiB before, peak {peak / 2**20:.0f} MiB "
          f"(+{grew / 2**20:.1f} MiB; largest tensor {largest / 2**20:.1f} MiB)")  # fmt: skip
    assert grew <= 3 * largest + 16 * 2**20


def test_export_with_validation(saved):
    """export(validate=...) scores the merged GGUF against base + adapter (the fine-tune)."""
    from conftest import TRAIN_TEXT

    import quantkit

    root, base, adapter = saved
    data = root / "eval.txt"
    data.write_text(TRAIN_TEXT)
    res = quantkit.export(
        str(base), ["gguf:F32"], root / "val", adapter=str(adapter), threads=2,
        validate={"data": str(data), "ctx": 64, "chunks": 2},
    )  # fmt: skip
    q = res.artifacts[0].metrics["quality"]
    assert q["kld_mean"] < 1e-4, q


def test_in_memory_export_with_validation(saved):
    """export(peft_model_in_memory, validate=...): the reference is the in-memory fine-tune itself,
    scored in this process (no folder holds its weights); the merged F32 matches it (the base
    alone is > 0.1 away, test_lora.py), Q8_0 is further, and the model's mode is restored."""
    import torch
    from conftest import TRAIN_TEXT
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantkit

    root, base, adapter = saved
    data = root / "eval-mem.txt"
    data.write_text(TRAIN_TEXT)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, adapter)
    pm.train()  # as a training loop leaves it
    res = quantkit.export(
        pm, ["gguf:F32", "gguf:Q8_0"], root / "val-mem", tokenizer=AutoTokenizer.from_pretrained(base),
        threads=2, validate={"data": str(data), "ctx": 64, "chunks": 2},
    )  # fmt: skip
    assert pm.training  # eval() only while scoring
    f32, q8 = (a.metrics for a in res.artifacts)
    print(
        "in-memory reference: KLD F32",
        f32["quality"]["kld_mean"],
        "Q8_0",
        q8["quality"]["kld_mean"],
    )
    assert f32["status"] == "ok" and f32["quality"]["kld_mean"] < 1e-4, f32["quality"]
    assert f32["quality"]["top1_pct"] == 100.0
    assert q8["quality"]["kld_mean"] > f32["quality"]["kld_mean"]
