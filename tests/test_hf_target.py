"""``--to hf[:DTYPE]``: a plain HF checkpoint folder, LoRA merged on the way, loaded back in
transformers (logits of the PEFT model), cast as torch casts, sharded with an index, written
atomically with memory bounded by the largest tensor, and scored in vLLM; ``--to bnb`` refused."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    TRAIN_TEXT,
    hf_logits,
    make_tiny_model,
    run_cli,
    validate_report,
    vllm_env_or_skip,
)

pytest.importorskip("peft")

from lora_helpers import VARIANTS, make_adapter, peft_logits  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    base = make_tiny_model(root / "base", "LlamaForCausalLM")
    adapter = make_adapter(base, root / "ad", **VARIANTS["rslora"])
    from transformers import AutoTokenizer

    tokens = AutoTokenizer.from_pretrained(base)(TRAIN_TEXT[:240])["input_ids"][:64]
    return dict(root=root, base=base, adapter=adapter, tokens=tokens)


def _merged(base: Path, adapter: Path):
    """PEFT's own merge (merge_and_unload) in float32: what the hf target must equal."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32, attn_implementation="eager")
    return PeftModel.from_pretrained(m, adapter).merge_and_unload().eval()


def _merged_state(base: Path, adapter: Path) -> dict:
    return {k: v.detach() for k, v in _merged(base, adapter).state_dict().items()}


def _merged_logits(base: Path, adapter: Path, tokens: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return _merged(base, adapter)(torch.tensor([tokens])).logits[0].float().numpy()


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    out: dict = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_merged_folder_matches_peft(tiny):
    """The merged F32 folder gives PEFT's logits in transformers, with the input's tensor names."""
    from safetensors import safe_open

    out = tiny["root"] / "merged"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapter"]),
                "--to", "hf", "-o", str(out), "--json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["artifacts"][0]
    assert art["path"] == str(out) and art["label"] == "hf" and art["shards"] == 1
    assert {p.name for p in out.iterdir()} == {
        "config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
        "tokenizer_config.json",
    }  # fmt: skip
    with safe_open(out / "model.safetensors", "pt") as f, \
         safe_open(tiny["base"] / "model.safetensors", "pt") as g:  # fmt: skip
        assert sorted(f.keys()) == sorted(g.keys())  # HF names, not GGUF ones
        assert f.metadata() == {"format": "pt"}
    got = hf_logits(out, tiny["tokens"])
    want = _merged_logits(tiny["base"], tiny["adapter"], tiny["tokens"])
    unmerged = peft_logits(tiny["base"], tiny["adapter"], tiny["tokens"])
    base = hf_logits(tiny["base"], tiny["tokens"])
    assert np.max(np.abs(base - want)) > 0.1  # the adapter changes the model
    diff = float(np.max(np.abs(got - want)))
    # PEFT's unmerged forward (x W + s (x A) B) sums in another order: float32 noise only
    loose = float(np.max(np.abs(got - unmerged)))
    print(f"max |Δ logit|: {diff:.3g} vs PEFT's merged model, {loose:.3g} vs its unmerged forward")
    assert diff <= 1e-5, diff
    assert loose <= 1e-4 and (got.argmax(-1) == unmerged.argmax(-1)).all(), loose


def test_dtypes_and_shards(tiny):
    """hf:bf16 / hf:fp16 hold exactly torch's cast of PEFT's merged weights, and config.json says
    so; a forced small shard size gives shards and an index that transformers loads."""
    import torch

    out = tiny["root"] / "typed"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapter"]),
                "--to", "hf:bf16", "--to", "hf:fp16", "--to", "hf:f32,shard=1MB", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    merged = _merged_state(tiny["base"], tiny["adapter"])
    f32 = _tensors(out / "ad-hf-f32")
    assert f32.keys() <= merged.keys() and "model.embed_tokens.weight" in f32
    worst = max(float((f32[k] - merged[k]).abs().max()) for k in f32)
    print(f"max |Δ weight| vs PEFT's merge_and_unload: {worst:.3g}")
    assert worst <= 1e-6  # the same merge, up to float32 summation order
    for label, dt in (("bf16", torch.bfloat16), ("f16", torch.float16), ("f32", torch.float32)):
        folder = out / f"ad-hf-{label}"
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["dtype"] == str(dt).removeprefix("torch.")
        got = _tensors(folder)
        assert got.keys() == f32.keys()
        for k, t in got.items():
            assert t.dtype == dt, (label, k)
            assert torch.equal(t, f32[k].to(dt)), (label, k)  # torch's rounding, bit for bit
    sharded = out / "ad-hf-f32"
    shards = sorted(sharded.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and all(p.stat().st_size <= 10**6 + 8192 for p in shards)
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == {p.name for p in shards}
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in _tensors(sharded).values())
    got = hf_logits(sharded, tiny["tokens"])
    want = _merged_logits(tiny["base"], tiny["adapter"], tiny["tokens"])
    assert float(np.max(np.abs(got - want))) <= 1e-5


def test_failure_leaves_nothing(tiny):
    """A tensor beyond the F16 range fails hf:fp16 mid-write: exit 2, one line, no output and no
    temporary left; an existing output is refused without --force."""
    from safetensors.torch import load_file, save_file

    src = tiny["root"] / "big"
    import shutil

    shutil.copytree(tiny["base"], src)
    sd = load_file(src / "model.safetensors")
    last = sorted(sd)[-1]  # written late: earlier tensors are already in the temporary
    sd[last] = sd[last].clone()
    sd[last].view(-1)[0] = 1e6
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    out = tiny["root"] / "fails" / "m"
    r = run_cli("convert", str(src), "--to", "hf:fp16", "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert "F16 range" in r.stderr and "hf:bf16" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tiny["root"] / "fails").exists()  # nor the folder -o would have created
    ok = tiny["root"] / "exists"
    ok.mkdir()
    r = run_cli("convert", str(tiny["base"]), "--to", "hf", "-o", str(ok))
    assert r.returncode == 2 and "already exists" in r.stderr
    assert list(ok.iterdir()) == []


def test_bnb_refused(tiny):
    for spec in ("bnb", "bitsandbytes", "BNB:nf4"):
        r = run_cli("convert", str(tiny["base"]), "--to", spec, "-o", str(tiny["root"] / "bnb"))
        assert r.returncode == 2, r.stderr
        line = r.stderr.strip()
        assert len(line.splitlines()) == 1 and "bitsandbytes" in line
        assert "gptq" in line and "fp8" in line
    assert not (tiny["root"] / "bnb").exists()


PEAK = """
import sys
import quantkit.convert.hf_checkpoint as hc, quantkit.convert.hf_to_gguf, quantkit.convert.lora  # imports first
base, adapter, out, spec = sys.argv[1:5]
def status(key):
    for ln in open("/proc/self/status"):
        if ln.startswith(key):
            return int(ln.split()[1]) * 1024
before = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:  # reset VmHWM to the current RSS
    f.write("5")
hc.write_hf_checkpoint(base, spec, out, adapter=adapter if adapter != "-" else None)
print(before, status("VmHWM"))
"""


@pytest.mark.parametrize("spec,merge", [("hf", True), ("hf:bf16", False)])
def test_peak_memory_bounded_by_largest_tensor(tmp_path, spec, merge):
    """Peak RSS growth while writing stays near the largest tensor (float32 copy + LoRA delta
    when merged; only the cast's slices otherwise), far below the model's size."""
    base = make_tiny_model(
        tmp_path / "b", "LlamaForCausalLM", hidden_size=512, intermediate_size=2048,
        num_hidden_layers=6, vocab_size=4096,
    )  # fmt: skip
    adapter = make_adapter(base, tmp_path / "a", r=8, lora_alpha=16) if merge else "-"
    from safetensors import safe_open

    with safe_open(base / "model.safetensors", "np") as f:
        sizes = [f.get_slice(k).get_shape() for k in f.keys()]
    largest = max(int(np.prod(s)) * 4 for s in sizes)
    model_bytes = (base / "model.safetensors").stat().st_size
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run(
        [sys.executable, "-c", PEAK, str(base), str(adapter), str(tmp_path / "o"), spec],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    before, peak = map(int, r.stdout.split()[-2:])
    grew = peak - before
    print(f"{spec}{' + LoRA' if merge else ''}: peak RSS +{grew / 2**20:.1f} MiB; largest tensor "
          f"{largest / 2**20:.1f} MiB, model {model_bytes / 2**20:.0f} MiB")  # fmt: skip
    # merged: the tensor's float32 copy and its LoRA delta (measured 2.0 × largest); a cast:
    # the tensor's pages of the source map and one slice's temporaries (measured 1.4 ×)
    assert grew <= (3 if merge else 1) * largest + 8 * 2**20, (grew, largest)
    assert grew < model_bytes / 2


def test_hf_folder_scores_in_vllm(tiny):
    """The merged folder, validated like any HF folder in vLLM against base + adapter in
    transformers: the same float32 weights, so top-1 everywhere and KLD at float noise."""
    vllm_env_or_skip()
    out = tiny["root"] / "for-vllm"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapter"]),
                "--to", "hf", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    text = tiny["root"] / "text.txt"
    text.write_text(TRAIN_TEXT)
    r, rep = validate_report(
        [out], tiny["base"], text, tiny["root"] / "vllm.json",
        "--adapter", str(tiny["adapter"]), "--engine", "vllm", "--topk", "20", "--vllm-eager",
    )  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    a = rep["artifacts"][0]
    assert a["status"] == "ok" and a["engine"]["name"] == "vllm", a
    q = a["quality"]
    print(f"vLLM on the hf folder: top-1 {q['top1_pct']} %, KLD {q['kld_mean']:.3g}, "
          f"PPL {q['ppl']:.4f} (reference {rep['reference']['ppl']:.4f})")  # fmt: skip
    assert q["top1_pct"] == 100.0 and q["kld_mean"] < 1e-5, q


def test_export_api_writes_hf_from_memory_and_path(tiny):
    """quantkit.export takes "hf" beside GGUF targets, for a PEFT model in memory and for base +
    adapter on disk: the same merged tensors as the CLI's folder, one STEM-hf folder each."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantkit

    cli = tiny["root"] / "cli-hf"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapter"]),
                "--to", "hf", "-o", str(cli))  # fmt: skip
    assert r.returncode == 0, r.stderr
    want = _tensors(cli)
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32), tiny["adapter"]
    )
    mem = quantkit.export(pm, ["gguf:F32", "hf"], tiny["root"] / "api-mem", name="ft",
                          tokenizer=AutoTokenizer.from_pretrained(tiny["base"]))  # fmt: skip
    disk = quantkit.export(str(tiny["base"]), "hf:bf16", tiny["root"] / "api-disk",
                           adapter=tiny["adapter"])  # fmt: skip
    assert [(a.format, a.label) for a in mem.artifacts] == [("gguf", "F32"), ("hf", "hf")]
    hf = mem.artifacts[1]
    from quantkit.hashing import model_hash

    # a folder's hash is one over its files' names and bytes, as validation reports it
    assert hf.path == tiny["root"] / "api-mem" / "ft-hf" and hf.sha256 == model_hash(hf.path)
    got = _tensors(hf.path)
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in want)
    (d,) = disk.artifacts
    assert d.path.name == "ad-hf-bf16" and disk.architecture == "LlamaForCausalLM"
    got = _tensors(d.path)
    assert all(torch.equal(got[k], want[k].to(torch.bfloat16)) for k in want)


TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_finetune_with_added_token_keeps_its_tokenizer(tiny):
    """A fine-tune that added a token (embed_tokens / lm_head resized and trained in full) and
    set a chat template: the folder has its vocabulary size, tokenizer and template, and gives the
    PEFT model's logits on text that uses the new token."""
    import torch
    from lora_helpers import LINEAR
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ad = tiny["root"] / "ad-tool"
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    tok.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    model.resize_token_embeddings(513)
    pm = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                        target_modules=LINEAR, modules_to_save=["embed_tokens", "lm_head"]))  # fmt: skip
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)
    pm.save_pretrained(ad)
    tok.save_pretrained(ad)
    ids = tok("Bolt <|tool|> counts 1, 2, 3 <|tool|> and Mia")["input_ids"]
    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32,
                                                attn_implementation="eager")  # fmt: skip
    base.resize_token_embeddings(513)
    with torch.no_grad():
        want = PeftModel.from_pretrained(base, ad).eval()(torch.tensor([ids])).logits[0].numpy()

    out = tiny["root"] / "merged-tool"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(ad), "--to", "hf", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "config.json").read_text())["vocab_size"] == 513
    got_tok = AutoTokenizer.from_pretrained(out)
    assert got_tok.chat_template == TEMPLATE and got_tok(TRAIN_TEXT[:80]) == tok(TRAIN_TEXT[:80])
    got = hf_logits(out, ids)
    assert float(np.max(np.abs(got - want))) <= 1e-4
    assert (got.argmax(-1) == want.argmax(-1)).all()
