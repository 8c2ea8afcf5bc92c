"""PEFT LoRA adapters: merged while converting, and written as GGUF LoRAs, checked in llama.cpp
against the PEFT model in transformers (the fine-tune is the reference, not the base)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, gguf_logits, make_tiny_model, run_cli, vllm_env_or_skip
from lora_helpers import LINEAR, VARIANTS, make_adapter, peft_logits

pytest.importorskip("peft")


def _tokens(base: Path) -> list[int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)(TRAIN_TEXT[:240])["input_ids"][:64]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Base, both adapters, the PEFT reference logits, and the base's F32 / Q8_0 GGUFs."""
    root = tmp_path_factory.mktemp("lora")
    base = make_tiny_model(root / "base", "LlamaForCausalLM")
    tokens = _tokens(base)
    adapters = {k: make_adapter(base, root / f"ad-{k}", **v) for k, v in VARIANTS.items()}
    ref = {k: peft_logits(base, a, tokens) for k, a in adapters.items()}
    r = run_cli(
        "convert", str(base), "--to", "gguf:F32", "--to", "gguf:Q8_0", "-o", str(root / "gg")
    )
    assert r.returncode == 0, r.stderr
    return dict(
        root=root,
        base=base,
        tokens=tokens,
        adapters=adapters,
        ref=ref,
        f32=root / "gg" / "base-F32.gguf",
        q8=root / "gg" / "base-Q8_0.gguf",
    )


def _close(got: np.ndarray, want: np.ndarray) -> float:
    diff = float(np.max(np.abs(got - want)))
    print(f"max |Δ logit| vs PEFT = {diff:.3g}")
    assert diff <= 1e-3, diff
    assert (got.argmax(-1) == want.argmax(-1)).all()
    return diff


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merged_f32_matches_peft(tiny, variant):
    out = tiny["root"] / f"merged-{variant}"
    r = run_cli(
        "convert", str(tiny["base"]), "--adapter", str(tiny["adapters"][variant]),
        "--to", "gguf:F32", "--to", "gguf-lora", "-o", str(out), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    import gguf

    card = gguf.GGUFReader(out / f"ad-{variant}-F32.gguf").fields
    assert card["general.base_model.0.name"].contents() == str(tiny["base"])  # provenance
    got = gguf_logits(out / f"ad-{variant}-F32.gguf", tiny["tokens"])
    want = tiny["ref"][variant]
    base = gguf_logits(tiny["f32"], tiny["tokens"])
    assert np.max(np.abs(base - want)) > 0.1  # the adapter changes the model
    _close(got, want)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_gguf_lora_on_f32_base_matches_peft(tiny, variant):
    import gguf

    from quantkit.validate.llamacpp import LlamaCppModel

    path = tiny["root"] / f"merged-{variant}" / f"ad-{variant}-lora-F32.gguf"
    if not path.exists():  # written by test_merged_f32_matches_peft; make it when run alone
        r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapters"][variant]),
                    "--to", "gguf-lora", "-o", str(path))  # fmt: skip
        assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(path)
    assert rd.fields["general.type"].contents() == "adapter"
    assert rd.fields["adapter.type"].contents() == "lora"
    assert rd.fields["adapter.lora.alpha"].contents() == 16.0
    assert len(rd.tensors) == 2 * 2 * len(LINEAR)
    m = LlamaCppModel(tiny["f32"], n_ctx=64, threads=2, kv_f32=True)
    try:
        m.set_adapter(path)
        got = m.logits(tiny["tokens"])
        m.set_adapter(None)  # removing it gives the base back
        base = m.logits(tiny["tokens"])
    finally:
        m.close()
    _close(got, tiny["ref"][variant])
    assert np.max(np.abs(base - tiny["ref"][variant])) > 0.1


def _kld(p_logits: np.ndarray, q_logits: np.ndarray) -> float:
    def logsm(x):
        x = x.astype(np.float64)
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = logsm(p_logits), logsm(q_logits)
    return float(np.mean(np.sum(np.exp(lp) * (lp - lq), -1)))


def test_gguf_lora_on_q8_base(tiny, record_property):
    """rsLoRA GGUF LoRA on the base's Q8_0 loads; its KLD to the merged Q8_0 is small."""
    from quantkit.validate.llamacpp import LlamaCppModel

    out = tiny["root"] / "q8"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapters"]["rslora"]),
                "--to", "gguf:Q8_0", "--to", "gguf-lora", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    merged = gguf_logits(out / "ad-rslora-Q8_0.gguf", tiny["tokens"])
    m = LlamaCppModel(tiny["q8"], n_ctx=64, threads=2, kv_f32=True)
    try:
        base = m.logits(tiny["tokens"])
        m.set_adapter(out / "ad-rslora-lora-F32.gguf")
        applied = m.logits(tiny["tokens"])
    finally:
        m.close()
    kld = _kld(merged, applied)
    kld_base = _kld(merged, base)
    record_property("kld_lora_on_q8_vs_merged_q8", kld)
    print(f"KLD(merged Q8_0 || Q8_0 base + GGUF LoRA) = {kld:.3g}; base alone: {kld_base:.3g}")
    assert kld < 0.01 and kld < kld_base / 10


# -- bad adapters: one-line error, exit 2, nothing written ---------------------------------------


def _copy_adapter(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _edit_config(ad: Path, **changes) -> None:
    p = ad / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(changes)
    p.write_text(json.dumps(cfg))


def _bad(tiny, name: str, prepare, *to: str) -> str:
    ad = _copy_adapter(tiny["adapters"]["plain"], tiny["root"] / f"bad-{name}")
    prepare(ad)
    out = tiny["root"] / f"out-bad-{name}"
    args = [a for t in (to or ("gguf:F16",)) for a in ("--to", t)]
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(ad), *args, "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert not out.exists() or not any(out.iterdir())
    return lines[0]


def test_dora_refused(tiny):
    msg = _bad(tiny, "dora", lambda ad: _edit_config(ad, use_dora=True))
    assert "DoRA" in msg


def test_non_lora_type_refused(tiny):
    msg = _bad(tiny, "ia3", lambda ad: _edit_config(ad, peft_type="IA3"))
    assert "'IA3' is not supported" in msg


def test_missing_weights_refused(tiny):
    msg = _bad(tiny, "missing", lambda ad: (ad / "adapter_model.safetensors").unlink())
    assert "missing adapter_model.safetensors" in msg


def test_shape_mismatch_names_both(tiny):
    from safetensors.numpy import load_file, save_file

    def shrink(ad: Path) -> None:
        f = ad / "adapter_model.safetensors"
        sd = load_file(f)
        key = "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
        sd[key] = np.ascontiguousarray(sd[key][:, :128])
        save_file(sd, f)

    msg = _bad(tiny, "shape", shrink)
    assert "layers.0.mlp.up_proj.lora_A.weight [8, 128]" in msg
    assert "base model.layers.0.mlp.up_proj.weight [512, 256]" in msg


def test_embedding_lora_refused_for_gguf_lora(tiny):
    def add_embedding(ad: Path) -> None:
        import shutil

        shutil.rmtree(ad)
        make_adapter(tiny["base"], ad, target_modules=["embed_tokens", "q_proj"], r=4, lora_alpha=8)

    msg = _bad(tiny, "embed", add_embedding, "gguf-lora")
    assert "gguf-lora cannot carry LoRA on embeddings (model.embed_tokens)" in msg


def test_base_name_mismatch_warns(tiny):
    ad = _copy_adapter(tiny["adapters"]["plain"], tiny["root"] / "renamed")
    _edit_config(ad, base_model_name_or_path="someorg/other-model")
    out = tiny["root"] / "out-renamed"
    r = run_cli(
        "convert", str(tiny["base"]), "--adapter", str(ad), "--to", "gguf-lora", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    assert "warning: adapter renamed was trained on 'someorg/other-model'" in r.stderr
    assert (out / "renamed-lora-F32.gguf").is_file()


def test_embedding_lora_merged_matches_peft(tiny):
    """LoRA on embed_tokens (PEFT's lora_embedding_A/B, applied transposed) merges exactly."""
    ad = make_adapter(tiny["base"], tiny["root"] / "ad-embed", target_modules=["embed_tokens", "q_proj"],
                      r=4, lora_alpha=8)  # fmt: skip
    out = tiny["root"] / "merged-embed"
    r = run_cli(
        "convert", str(tiny["base"]), "--adapter", str(ad), "--to", "gguf:F32", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    _close(
        gguf_logits(out / "ad-embed-F32.gguf", tiny["tokens"]),
        peft_logits(tiny["base"], ad, tiny["tokens"]),
    )


TOOL = "<|tool|>"
N_ROWS = 513
TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
)


def test_finetune_with_added_token_and_template(tiny):
    """A fine-tune that added a special token (resized embed_tokens/lm_head in modules_to_save)
    and set a chat template: the merged GGUF has the token with its id and type, tokenizes text
    with it as transformers does, carries the fine-tune's template and matches PEFT's logits."""
    import gguf
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from quantkit.validate.llamacpp import LlamaCppModel

    ad = tiny["root"] / "ad-tool"
    tok = AutoTokenizer.from_pretrained(tiny["base"])
    tok.add_special_tokens({"additional_special_tokens": [TOOL]})
    tok.chat_template = TEMPLATE
    model = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32)
    # the tiny BPE has fewer tokens than embedding rows: the new token takes the next free id
    # and the embeddings grow by one row (512 -> 513), as a fine-tune that resized them would
    model.resize_token_embeddings(N_ROWS)
    cfg = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=LINEAR,
                     modules_to_save=["embed_tokens", "lm_head"])  # fmt: skip
    pm = get_peft_model(model, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
            elif "modules_to_save" in name:
                p.add_(torch.randn_like(p) * 0.05)  # trained in full
    pm.save_pretrained(ad)
    tok.save_pretrained(ad)
    text = f"Bolt {TOOL} counts 1, 2, 3 {TOOL} and Mia"
    ids = tok(text)["input_ids"]
    tool_id = tok.convert_tokens_to_ids(TOOL)
    assert tool_id in ids and tool_id == len(tok) - 1

    base = AutoModelForCausalLM.from_pretrained(tiny["base"], dtype=torch.float32,
                                                attn_implementation="eager")  # fmt: skip
    base.resize_token_embeddings(N_ROWS)
    ref_model = PeftModel.from_pretrained(base, ad).eval()
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0].float().numpy()

    out = tiny["root"] / "merged-tool.gguf"
    r = run_cli(
        "convert", str(tiny["base"]), "--adapter", str(ad), "--to", "gguf:F32", "-o", str(out)
    )
    assert r.returncode == 0, r.stderr
    rd = gguf.GGUFReader(out)
    tokens = rd.fields["tokenizer.ggml.tokens"]
    types = rd.fields["tokenizer.ggml.token_type"]
    assert len(tokens.data) == N_ROWS
    assert tokens.contents(tool_id) == TOOL
    assert types.contents(tool_id) == gguf.TokenType.CONTROL
    assert rd.fields["tokenizer.chat_template"].contents() == TEMPLATE
    m = LlamaCppModel(out, n_ctx=64, threads=2, kv_f32=True)
    try:
        assert m.tokenize(text, add_bos=False) == tok(text, add_special_tokens=False)["input_ids"]
        got = m.logits(ids)
    finally:
        m.close()
    _close(got, ref)


def test_validate_against_the_finetune(tiny):
    """`quantkit validate --adapter`: the reference is base + adapter in transformers; the merged
    GGUF and the GGUF LoRA on the base GGUF (--lora-base) both score as the fine-tune, the base
    GGUF alone does not."""
    ad = tiny["adapters"]["rslora"]
    out = tiny["root"] / "val"
    r = run_cli("convert", str(tiny["base"]), "--adapter", str(ad),
                "--to", "gguf:F32", "--to", "gguf-lora", "-o", str(out))  # fmt: skip
    assert r.returncode == 0, r.stderr
    data = tiny["root"] / "eval.txt"
    data.write_text(TRAIN_TEXT)
    report = tiny["root"] / "report.json"
    arts = [out / "ad-rslora-F32.gguf", out / "ad-rslora-lora-F32.gguf", tiny["f32"]]
    r = run_cli("validate", *map(str, arts), "--reference", str(tiny["base"]),
                "--adapter", str(ad), "--lora-base", str(tiny["f32"]), "--data", str(data),
                "--ctx", "64", "--chunks", "2", "--pp", "0", "--tg", "0", "--kv-f32",
                "--no-cache", "--json", str(report))  # fmt: skip
    assert r.returncode == 0, r.stderr + r.stdout
    rep = json.loads(report.read_text())
    kld = {a["name"]: a["quality"]["kld_mean"] for a in rep["artifacts"]}
    print("validate KLD vs base+adapter:", kld)
    assert kld["ad-rslora-F32.gguf"] < 1e-5
    assert kld["ad-rslora-lora-F32.gguf"] < 1e-5
    assert kld["base-F32.gguf"] > 0.1


@pytest.fixture(scope="module")
def vllm_loras(tiny) -> dict[str, Path]:
    """--to vllm-lora of both adapters, plus the text validate scores."""
    dirs = {}
    for v in VARIANTS:
        out = tiny["root"] / f"vllm-{v}"
        r = run_cli("convert", str(tiny["base"]), "--adapter", str(tiny["adapters"][v]),
                    "--to", "vllm-lora", "-o", str(out))  # fmt: skip
        assert r.returncode == 0, r.stderr
        dirs[v] = out / f"ad-{v}-vllm-lora"
        assert json.loads((dirs[v] / "quantkit-vllm.json").read_text())["max_lora_rank"] == 8
    data = tiny["root"] / "eval-vllm.txt"
    data.write_text(TRAIN_TEXT)
    return {**dirs, "data": data}


def _validate_lora(tiny, vllm_loras, variant: str, *extra_arts: Path, speed=("0", "0")) -> dict:
    report = tiny["root"] / f"report-vllm-{variant}.json"
    r = run_cli("validate", str(vllm_loras[variant]), *map(str, extra_arts),
                "--reference", str(tiny["base"]), "--adapter", str(tiny["adapters"][variant]),
                "--data", str(vllm_loras["data"]), "--ctx", "64", "--chunks", "2",
                "--pp", speed[0], "--tg", speed[1], "--kv-f32", "--vllm-dtype", "float32",
                "--vllm-eager", "--threads", "2", "--no-cache", "--json", str(report),
                timeout=900)  # fmt: skip
    rep = json.loads(report.read_text()) if report.is_file() else {}
    assert r.returncode == 0, r.stderr[-3000:] + r.stdout
    return rep


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_vllm_lora_validated_against_the_finetune(tiny, vllm_loras, variant, record_property):
    """`quantkit validate` scores a vllm-lora artifact in vLLM (CPU build) on its base with the
    adapter applied through vLLM's LoRA requests (one engine start), against base + adapter in
    transformers: KLD ~0 and prompt log-probs in float32 within 1e-4 of PEFT's, plain and
    rsLoRA; the base alone (its F32 GGUF, same report) is far from the fine-tune."""
    vllm_env_or_skip()
    extra = (tiny["f32"],) if variant == "rslora" else ()
    rep = _validate_lora(tiny, vllm_loras, variant, *extra,
                         speed=("16", "4") if variant == "rslora" else ("0", "0"))  # fmt: skip
    assert rep["reference"]["cache"]["dtype"] == "float32"  # exact enough for a 1e-4 check
    art = rep["artifacts"][0]
    assert art["status"] == "ok", art
    assert art["engine"]["name"] == "vllm" and art["engine"]["dtype"] == "float32"
    assert art["engine"]["lora"] == str(vllm_loras[variant].resolve())
    assert art["engine"]["max_lora_rank"] == 8
    assert art["lora_base"] == str(tiny["base"])
    assert art["size"]["file_type"] == ("LoRA r8 rs" if variant == "rslora" else "LoRA r8")
    q = art["quality"]
    diff = q["max_abs_dlogprob"]
    record_property(f"vllm_lora_{variant}_max_abs_logprob_diff", diff)
    print(
        f"vLLM LoRA {variant}: max |Δ log-prob| vs PEFT = {diff:.3g}, approx KLD {q['kld_mean']:.3g}"
    )
    assert diff <= 1e-4, (variant, diff)
    assert q["kld_mean"] < 1e-6 and q["top1_pct"] == 100.0, q
    if variant == "rslora":
        assert art["speed"]["pp_tps"] and art["speed"]["tg_tps"]  # speed runs carry the LoRA
        base = rep["artifacts"][1]
        assert base["status"] == "ok" and base["quality"]["kld_mean"] > 0.1, base


def _validate_refused(tiny, *args: str) -> str:
    r = run_cli("validate", *args, "--reference", str(tiny["base"]),
                "--data", str(tiny["root"] / "eval.txt"), "--ctx", "64")  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    return lines[0]


def test_vllm_lora_validate_refusals(tiny, vllm_loras):
    """Bad combinations for a vllm-lora artifact are refused before any engine starts."""
    (tiny["root"] / "eval.txt").write_text(TRAIN_TEXT)
    ad = vllm_loras["plain"]
    msg = _validate_refused(tiny, str(ad))  # no --adapter: the reference would be the base
    assert "no --adapter was given" in msg and "--adapter DIR" in msg
    fine = ("--adapter", str(tiny["adapters"]["plain"]))
    msg = _validate_refused(tiny, str(ad), *fine, "--lora-base", str(ad))
    assert "neither a GGUF file nor a Hugging Face model folder" in msg
    msg = _validate_refused(tiny, str(ad), *fine,
                            "--lora-base", str(tiny["f32"]), "--lora-base", str(tiny["q8"]))  # fmt: skip
    assert "--lora-base given 2 GGUFs" in msg

    bad = _copy_adapter(ad, tiny["root"] / "bad-vllm-shape")

    def shrink(sd):
        k = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
        sd[k] = sd[k][:, :128].copy()

    _edit_tensors(bad, shrink)
    msg = _validate_refused(tiny, str(bad), *fine)
    assert "do not fit base model.layers.0.self_attn.q_proj.weight [256, 256]" in msg


def _edit_tensors(ad: Path, fn) -> None:
    from safetensors.numpy import load_file, save_file

    f = ad / "adapter_model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f)


def test_target_missing_from_base_refused(tiny):
    """A LoRA on a module the base does not have (another architecture's name) is named."""

    def rename(sd):
        for side in ("A", "B"):
            old = f"base_model.model.model.layers.1.self_attn.q_proj.lora_{side}.weight"
            sd[old.replace("q_proj", "qkv_proj")] = sd.pop(old)

    msg = _bad(tiny, "missing-module", lambda ad: _edit_tensors(ad, rename))
    assert "model.layers.1.self_attn.qkv_proj (targeted by the adapter) has no tensor" in msg


def test_vllm_lora_refuses_full_modules(tiny):
    """vLLM takes no fully trained lm_head in an adapter (one classification head only)."""

    def add_head(sd):
        sd["base_model.model.lm_head.modules_to_save.weight"] = np.zeros((512, 256), np.float32)

    msg = _bad(tiny, "vllm-head", lambda ad: _edit_tensors(ad, add_head), "vllm-lora")
    assert "vllm-lora: fully trained modules (lm_head.weight) are not LoRA" in msg
