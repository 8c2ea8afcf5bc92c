"""vLLM exports (GPTQ, AWQ, FP8 through llm-compressor; legacy gptq/awq repacking; preflight).

The exports need the llmcompressor environment (`quantkit engines setup llmcompressor`); those
tests skip with that reason when it is absent. The ``vllm_exports`` fixture (tests/conftest.py)
builds every tiny export once per session so that other test files (loading them in vLLM) reuse
them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import TRAIN_TEXT, llmc_python_or_skip, run_cli

torch = pytest.importorskip("torch")


def _llmc_python() -> Path:
    return llmc_python_or_skip()


# -- target options ------------------------------------------------------------------------------


def test_target_options_parse_and_reject_unknown():
    from quantkit.errors import InputError
    from quantkit.targets import parse_target

    t = parse_target("gptq:bits=8,group=64,actorder=weight,dampening=0.05,sym=false")
    assert (t.bits, t.group, t.actorder, t.dampening, t.sym) == (8, 64, "weight", 0.05, False)
    assert t.to_recipe()["weights"] == {
        "num_bits": 8,
        "type": "int",
        "symmetric": False,
        "strategy": "group",
        "group_size": 64,
        "actorder": "weight",
    }
    assert t.to_recipe()["kwargs"] == {"dampening_frac": 0.05}
    assert parse_target("awq:group=channel").to_recipe()["weights"]["strategy"] == "channel"
    assert parse_target("AWQ").sym is False  # AWQ's usual asymmetric scheme
    assert parse_target("fp8").scheme == "dynamic"
    assert not parse_target("fp8").needs_calibration
    assert parse_target("fp8:block").to_recipe()["preset"] == "FP8_BLOCK"
    assert parse_target("fp8:scheme=static").needs_calibration
    for bad, words in [
        ("gptq:bitz=4", "unknown option 'bitz'"),
        ("awq:actorder=weight", "unknown option 'actorder'"),  # GPTQ-only option
        ("gptq:actorder=group", "actorder"),  # removed in compressed-tensors 0.19
        ("gptq:group=100", "group must be 32, 64, 128 or channel"),
        ("gptq:bits=3", "bits"),
        ("fp8:group=64", "unknown option 'group'"),
        ("fp8:fast", "scheme"),
        ("gptq:64", "has no value"),
    ]:
        with pytest.raises(InputError) as e:
            parse_target(bad)
        assert words in str(e.value), (bad, str(e.value))


def test_cli_refuses_unknown_option_and_writes_nothing(tmp_path):
    out = tmp_path / "out"
    r = run_cli("convert", str(tmp_path), "--to", "gptq:bits=4,speed=fast", "-o", str(out))
    assert r.returncode == 2, r.stderr
    assert "unknown option 'speed'" in r.stderr and "gptq options:" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


# -- legacy packing (no llm-compressor needed) ---------------------------------------------------


def _random_layer(bits: int, group: int, out_f: int = 64, in_f: int = 128, g_idx: bool = False):
    from quantkit.quantize.vllm.legacy import IntLayer

    gen = torch.Generator().manual_seed(bits * 1000 + group)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    n_groups = in_f // group
    q = torch.randint(lo, hi + 1, (out_f, in_f), generator=gen)
    zero = torch.randint(lo, hi + 1, (out_f, n_groups), generator=gen)
    scale = (torch.rand(out_f, n_groups, generator=gen) + 0.01).half().float()  # fp16-exact
    gi = torch.arange(in_f, dtype=torch.int32) // group
    if g_idx:
        gi = gi[torch.randperm(in_f, generator=gen)]
    return IntLayer(q, zero, scale, gi, bits, group, g_idx)


def dequantize(layer):
    """The float weights an IntLayer stands for (quantize/vllm/legacy.py)."""
    idx = layer.g_idx.long()
    return (layer.q.float() - layer.zero[:, idx].float()) * layer.scale[:, idx].float()


# -- the legacy layouts read back (the inverse of gptq_tensors / awq_tensors) ---------------------


def read_gptq_layer(t: dict, prefix: str, bits: int, group: int):
    """Dequantizable view of an AutoGPTQ v1 layer: the inverse of gptq_tensors."""
    from quantkit.quantize.vllm.legacy import IntLayer, unpack_cols, unpack_rows

    off = 1 << (bits - 1)
    qweight = t[f"{prefix}.qweight"]
    out_f = qweight.shape[1]
    q = unpack_rows(qweight, bits).t() - off
    zero = unpack_cols(t[f"{prefix}.qzeros"], bits, out_f).t()
    zero = ((zero + 1) & ((1 << bits) - 1)) - off  # v1: stored zero − 1
    g_idx = t[f"{prefix}.g_idx"]
    return IntLayer(q, zero, t[f"{prefix}.scales"].t(), g_idx, bits, group, True)


def read_awq_layer(t: dict, prefix: str, group: int):
    """Dequantizable view of an AutoAWQ GEMM layer: the inverse of awq_tensors."""
    from quantkit.quantize.vllm.legacy import AWQ_ORDER, IntLayer, unpack_cols

    qweight = t[f"{prefix}.qweight"]
    in_f = qweight.shape[0]
    q = unpack_cols(qweight, 4, order=AWQ_ORDER).t() - 8
    zero = unpack_cols(t[f"{prefix}.qzeros"], 4, order=AWQ_ORDER).t() - 8
    g = group if group > 0 else in_f
    return IntLayer(
        q,
        zero,
        t[f"{prefix}.scales"].t(),
        torch.arange(in_f, dtype=torch.int32) // g,
        4,
        group,
        False,
    )


@pytest.mark.parametrize("bits,group,g_idx", [(4, 32, False), (4, 64, True), (8, 128, False)])
def test_gptq_layout_round_trip(bits, group, g_idx):
    from quantkit.quantize.vllm.legacy import gptq_tensors

    layer = _random_layer(bits, group, g_idx=g_idx)
    t = {f"m.{k}": v for k, v in gptq_tensors(layer, torch.float16).items()}
    pf = 32 // bits
    assert t["m.qweight"].shape == (128 // pf, 64) and t["m.qweight"].dtype == torch.int32
    assert t["m.qzeros"].shape == (128 // group, 64 // pf) and t["m.qzeros"].dtype == torch.int32
    assert t["m.scales"].shape == (128 // group, 64) and t["m.scales"].dtype == torch.float16
    assert t["m.g_idx"].shape == (128,) and t["m.g_idx"].dtype == torch.int32
    back = read_gptq_layer(t, "m", bits, group)
    assert torch.equal(back.q, layer.q) and torch.equal(back.zero, layer.zero)
    assert torch.equal(dequantize(back), dequantize(layer))


def test_gptq_v1_zero_minus_one_and_input_dim_packing():
    """Hand-checked words: the first qweight word holds input channels 0..7 of output 0 (low
    nibble first, unsigned q+8); qzeros hold zero+8-1 (v1), so symmetric zeros are 0x77777777."""
    from quantkit.quantize.vllm.legacy import IntLayer, gptq_tensors

    q = torch.zeros(8, 8, dtype=torch.int64)
    q[0, :] = torch.tensor([-8, -7, -6, -5, 4, 5, 6, 7])
    layer = IntLayer(
        q,
        torch.zeros(8, 1, dtype=torch.int64),
        torch.ones(8, 1),
        torch.zeros(8, dtype=torch.int32),
        4,
        -1,
        False,
    )
    t = gptq_tensors(layer, torch.float16)
    assert t["qweight"][0, 0].item() & 0xFFFFFFFF == 0xFEDC3210
    assert t["qweight"][0, 1].item() & 0xFFFFFFFF == 0x88888888
    assert t["qzeros"][0, 0].item() & 0xFFFFFFFF == 0x77777777


def test_awq_layout_matches_vllm_unpacking():
    """vLLM's awq loaders unpack a word's 4-bit fields low to high and reorder them with
    (0, 4, 1, 5, 2, 6, 3, 7) (cpu_wna16.py); doing that to our words must give the weights."""
    from quantkit.quantize.vllm.legacy import awq_tensors

    layer = _random_layer(4, 64)
    t = awq_tensors(layer, torch.float16)
    assert t["qweight"].shape == (128, 8) and t["qzeros"].shape == (2, 8)
    words = t["qweight"].to(torch.int64) & 0xFFFFFFFF
    fields = torch.stack([(words >> (4 * k)) & 0xF for k in range(8)], dim=2)  # [in, out/8, 8]
    natural = fields[:, :, [0, 4, 1, 5, 2, 6, 3, 7]].reshape(128, 64)
    assert torch.equal(natural.t() - 8, layer.q)
    back = read_awq_layer({f"m.{k}": v for k, v in t.items()}, "m", 64)
    assert torch.equal(dequantize(back), dequantize(layer))


# -- preflight (no llm-compressor run) -----------------------------------------------------------


def test_preflight_refuses_group_128_on_demo_listing_every_layer(demo_model_dir, tmp_path):
    from quantkit.quantize.vllm import expand_names

    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    out = tmp_path / "out"
    r = run_cli(
        "convert",
        str(demo_model_dir),
        "--to",
        "gptq:group=128",
        "--calib",
        str(calib),
        "-o",
        str(out),
    )
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "group size 128 does not divide" in err and "group=64" in err and "--ignore" in err
    named: set[str] = set()
    for part in err.split(": ", 3)[3].split(" — ")[0].split(", "):
        named.update(expand_names(part.rsplit(" (", 1)[0]))
    # hidden 576 = 4.5 × 128 feeds q/k/v/gate/up, 9 heads × 64 = 576 feed o_proj;
    # down_proj's 1536 = 12 × 128 is fine; lm_head is ignored by default
    want = {
        f"model.layers.{i}.{m}"
        for i in range(30)
        for m in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        )
    }
    assert named == want
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_preflight_suggested_ignore_makes_it_pass(demo_model_dir):
    from quantkit.quantize.vllm import VllmSettings, preflight
    from quantkit.targets import parse_target

    s = VllmSettings(ignore=("lm_head", "re:.*\\.(gate_proj|k_proj|o_proj|q_proj|up_proj|v_proj)$"))
    plan = preflight(demo_model_dir, parse_target("gptq:group=128"), s, None)
    assert {lay.name.rsplit(".", 1)[-1] for lay in plan.quantized} == {"down_proj"}
    assert len(plan.quantized) == 30 and plan.memory_estimate > 0


HEADER_ARCHS = {  # each model_type of vllm.HEADER_LAYOUT_TYPES, by its CausalLM class
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}


def _layer_set(found) -> set:
    return {(lay.name, lay.in_features, lay.out_features) for lay in found[1]}


def test_layers_from_headers_match_the_meta_build(tmp_path, demo_model_dir):
    """The header listing (no torch import) finds exactly the nn.Linear layers, widths and
    architecture that transformers' meta-device model has, for every listed model type, tied
    (lm_head not stored) and untied, and for the embedded default."""
    from conftest import make_tiny_model

    from quantkit.checkpoint import Checkpoint
    from quantkit.quantize import vllm

    assert set(HEADER_ARCHS) == vllm.HEADER_LAYOUT_TYPES
    small = dict(
        hidden_size=64, intermediate_size=96, num_attention_heads=2, head_dim=32, pad_token_id=0
    )
    models = [demo_model_dir]
    for i, (mtype, arch) in enumerate(HEADER_ARCHS.items()):
        tied = i % 2 == 0
        d = make_tiny_model(tmp_path / mtype, arch, tie_word_embeddings=tied, **small)
        with Checkpoint.open(d) as ck:
            assert ("lm_head.weight" in ck.tensors) is not tied
        models.append(d)
    for d in models:
        fast, meta = vllm.layers_from_headers(d), vllm.meta_linear_layers(d)
        assert fast is not None, d
        assert fast[0] == meta[0] and _layer_set(fast) == _layer_set(meta), d
        assert len(fast[1]) == len(meta[1]) and set(fast[2]) <= set(meta[2]), d
        assert "lm_head" in {lay.name for lay in fast[1]}


def test_layers_from_headers_declines_unlisted_architectures(tmp_path):
    """Any other model type (e.g. MoE with fused experts) takes the meta-device build."""
    import json

    from conftest import make_tiny_model

    from quantkit.quantize import vllm

    d = make_tiny_model(tmp_path / "m", "LlamaForCausalLM", hidden_size=64, intermediate_size=96)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "mixtral"
    (d / "config.json").write_text(json.dumps(cfg))
    assert vllm.layers_from_headers(d) is None


def test_calibration_tokens_match_the_reference_tokenizer(demo_model_dir, tmp_path):
    """The tokenizers-only path gives validate's reference ids (digits, special-token text,
    non-ASCII) for the tiny test tokenizer and the embedded default."""
    from conftest import make_tiny_model

    from quantkit.quantize import vllm
    from quantkit.validate.harness import tokenize_reference

    text = TRAIN_TEXT + " 12345 <|endoftext|> <|im_start|>user\nhi"
    for d in (demo_model_dir, make_tiny_model(tmp_path / "tiny", "LlamaForCausalLM")):
        assert vllm.tokenize_calibration(d, text) == tokenize_reference(d, text), d


def test_vllm_preflight_imports_neither_torch_nor_transformers(demo_model_dir, tmp_path):
    """quantkit's fixed cost before llm-compressor starts: the preflight and the calibration
    ids of a gptq export on the embedded default need no torch/transformers import."""
    import subprocess
    import sys

    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT * 10)
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from quantkit.quantize import vllm\n"
        "from quantkit.targets import parse_target\n"
        f"m = Path({str(demo_model_dir)!r})\n"
        f"s = vllm.VllmSettings(calib=Path({str(calib)!r}), samples=4, seq_len=64)\n"
        "plan = vllm.preflight(m, parse_target('gptq:group=64'), s, None)\n"
        "ids = vllm.calibration_ids(m, s.calib, s.samples, s.seq_len)\n"
        "print(len(plan.quantized), ids.shape, 'torch' in sys.modules, 'transformers' in sys.modules)\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["210", "(4,", "64)", "False", "False"], r.stdout + r.stderr


# -- tiny exports through llm-compressor ---------------------------------------------------------


def _tensors(d: Path) -> dict:
    from safetensors.torch import load_file

    t = {}
    for f in sorted(d.glob("*.safetensors")):
        t.update(load_file(f))
    return t


def _original(model: Path) -> dict:
    return {k: v.float() for k, v in _tensors(model).items()}


LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
BLOCK = {n: "self_attn" if n[0] in "qkvo" else "mlp" for n in LINEARS}


def _rel_err(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("label", ["gptq", "awq"])
def test_int4_export_config_tensors_and_weights(vllm_exports, label):
    from quantkit.quantize.vllm.legacy import read_int_layer, weights_args

    d = vllm_exports[label]
    cfg = json.loads((d / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "pack-quantized"
    w = weights_args(q)
    assert (w["num_bits"], w["group_size"], w["strategy"]) == (4, 64, "group")
    assert w["symmetric"] is (label == "gptq")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (d / f).is_file(), f
    t = _tensors(d)
    orig = _original(vllm_exports["model"])
    assert "lm_head.weight" in t or "lm_head.weight" not in orig  # ignored: stays float
    for i in range(2):
        for name in LINEARS:
            mod = f"model.layers.{i}.{BLOCK[name]}.{name}.weight"
            p = mod[: -len(".weight")]
            assert f"{p}.weight" not in t
            out_f, in_f = orig[mod].shape
            assert t[f"{p}.weight_packed"].dtype == torch.int32
            assert t[f"{p}.weight_packed"].shape == (out_f, in_f // 8)
            assert t[f"{p}.weight_scale"].shape == (out_f, in_f // 64)
            assert f"{p}.weight_g_idx" not in t  # act-order "weight" keeps groups in order
            assert (f"{p}.weight_zero_point" in t) is (label == "awq")  # awq: asymmetric
            deq = dequantize(read_int_layer(t, p, w))
            ref = orig[mod]
            if label == "awq":
                # AWQ multiplies each input column by a smoothing scale (and divides the
                # preceding norm/Linear by it): fit that per-column factor, then compare
                s_col = (deq * ref).sum(0) / (ref * ref).sum(0)
                assert (s_col > 0).all()
                ref = ref * s_col
            err = _rel_err(deq, ref)
            # 4-bit, groups of 64 on N(0, 0.1) weights: ~0.09 relative error for round-to-
            # nearest; GPTQ/AWQ trade weight error for output error on 256 calibration tokens
            # (measured 0.16 at most). 0 would mean nothing was quantized; a wrong packing
            # order gives ~1.4 (uncorrelated values)
            assert 0.02 < err < 0.3, (p, err)


@pytest.mark.parametrize("label", ["gptq", "awq"])
def test_legacy_layout_dequantizes_to_the_same_weights(vllm_exports, label):
    from quantkit.quantize.vllm.legacy import read_int_layer, weights_args

    ct, lg = vllm_exports[label], vllm_exports[f"{label}-legacy"]
    w = weights_args(json.loads((ct / "config.json").read_text())["quantization_config"])
    cfg = json.loads((lg / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q["quant_method"] == label and q["bits"] == 4 and q["group_size"] == 64
    if label == "gptq":
        assert q["desc_act"] is False and q["sym"] is True and q["checkpoint_format"] == "gptq"
    else:
        assert q["zero_point"] is True and q["version"] == "gemm"
    assert json.loads((lg / "quantize_config.json").read_text()) == q
    assert cfg["dtype"] == "float16"
    assert (lg / "tokenizer.json").is_file() and (lg / "generation_config.json").is_file()
    tc, tl = _tensors(ct), _tensors(lg)
    prefixes = [k[: -len(".weight_packed")] for k in tc if k.endswith(".weight_packed")]
    assert len(prefixes) == 2 * len(LINEARS)
    for p in prefixes:
        a = read_int_layer(tc, p, w)
        out_f, in_f = a.q.shape
        assert not any(k.startswith(p + ".weight") for k in tl)
        if label == "gptq":
            assert tl[f"{p}.qweight"].shape == (in_f // 8, out_f)
            assert tl[f"{p}.g_idx"].dtype == torch.int32
            b = read_gptq_layer(tl, p, 4, 64)
        else:
            assert tl[f"{p}.qweight"].shape == (in_f, out_f // 8)
            b = read_awq_layer(tl, p, 64)
        assert tl[f"{p}.qweight"].dtype == torch.int32 and tl[f"{p}.scales"].dtype == torch.float16
        assert torch.equal(a.q, b.q) and torch.equal(a.zero, b.zero)
        assert torch.equal(a.g_idx, b.g_idx.to(a.g_idx.dtype))
        torch.testing.assert_close(dequantize(a), dequantize(b), rtol=0, atol=0)
    for k, v in tl.items():  # float tensors (norms, embeddings) carried over
        if not k.endswith(("qweight", "qzeros", "scales", "g_idx")):
            torch.testing.assert_close(v.float(), tc[k].float())


def test_fp8_dynamic_export(vllm_exports):
    d = vllm_exports["fp8"]
    q = json.loads((d / "config.json").read_text())["quantization_config"]
    assert q["quant_method"] == "compressed-tensors" and q["format"] == "float-quantized"
    grp = next(iter(q["config_groups"].values()))
    assert grp["weights"]["type"] == "float" and grp["weights"]["num_bits"] == 8
    assert grp["input_activations"]["dynamic"] is True
    assert grp["input_activations"]["strategy"] == "token"
    t = _tensors(d)
    orig = _original(vllm_exports["model"])
    n = 0
    for k, v in orig.items():
        p = k[: -len(".weight")]
        if not k.endswith(tuple(f"{m}.weight" for m in LINEARS)):
            continue
        assert t[k].dtype == torch.float8_e4m3fn
        scale = t[f"{p}.weight_scale"]
        assert scale.shape == (v.shape[0], 1)  # per output channel
        err = _rel_err(t[k].float() * scale.float(), v)
        assert 0.001 < err < 0.06, (k, err)
        n += 1
    assert n == 2 * len(LINEARS)


def test_export_refuses_existing_output_and_leaves_no_temporaries(vllm_exports, tmp_path):
    py = _llmc_python()
    from quantkit.errors import OutputExistsError
    from quantkit.quantize.vllm import VllmSettings, export_vllm

    with pytest.raises(OutputExistsError):
        export_vllm(vllm_exports["model"], ["fp8"], vllm_exports["fp8"], VllmSettings(), python=py)
    assert not [p for p in vllm_exports["fp8"].parent.iterdir() if p.name.startswith(".")]


# -- memory: whole model, weights offloaded layer by layer, or refused ---------------------------


def test_memory_check_offloads_then_refuses_with_the_samples_that_fit(tmp_path, monkeypatch):
    """Whole model fits: nothing offloaded. It does not, but one layer at a time does: the
    weights beyond what fits go to disk. Not even that: exit 2 before anything loads, one line
    with both estimates, what is available and a --samples that fits."""
    from conftest import make_tiny_model

    from quantkit.checkpoint import Checkpoint
    from quantkit.memory import LIMIT_ENV as MEMORY_ENV
    from quantkit.quantize.vllm import VllmSettings, preflight
    from quantkit.quantize.vllm.checks import memory_estimate, offloaded_estimate
    from quantkit.quantize.vllm.layers import linear_layers
    from quantkit.targets import parse_target

    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM", dtype="float16")
    t = parse_target("gptq:group=64")
    s = VllmSettings(samples=64, seq_len=128)
    with Checkpoint.open(model) as ck:
        cfg, wb = ck.config, ck.nbytes
    layers = linear_layers(model)[1]
    whole = memory_estimate(wb, cfg, t, s, layers)
    floor = offloaded_estimate(wb, cfg, t, s, layers)
    assert floor < whole
    monkeypatch.setenv(MEMORY_ENV, str(whole))
    plan = preflight(model, t, s, None)
    assert plan.offload_cpu_bytes is None and plan.memory_estimate == whole
    monkeypatch.setenv(MEMORY_ENV, str(floor + 2**20))
    plan = preflight(model, t, s, None)
    assert plan.offload_cpu_bytes is not None and 0 < plan.offload_cpu_bytes < 2**20
    assert plan.memory_offloaded == floor
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT * 40)
    r = run_cli(
        "convert", str(model), "--to", "gptq:group=64", "--calib", str(calib),
        "--samples", "64", "--seq-len", "128", "-o", str(tmp_path / "out"),
        env={MEMORY_ENV: str(floor - 2**20)},
    )  # fmt: skip
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert f"needs about {whole / 2**30:.1f} GiB of memory with the model in memory" in err, err
    assert f"and {floor / 2**30:.1f} GiB with its weights offloaded to disk" in err, err
    assert f"{(floor - 2**20) / 2**30:.1f} GiB is available" in err, err
    fits = int(err.split("--samples ")[1].split()[0])
    assert 0 < fits < 64, err
    s2 = VllmSettings(samples=fits, seq_len=128)
    assert offloaded_estimate(wb, cfg, t, s2, layers) <= floor - 2**20
    assert not (tmp_path / "out").exists()


def test_offloaded_gptq_writes_the_same_checkpoint(vllm_exports, tmp_path, monkeypatch):
    """GPTQ with the weights on disk (compressed-tensors' offloading, one decoder layer in memory
    at a time) gives the checkpoint of the in-memory run: same config, same tensors."""
    py = _llmc_python()
    from quantkit.checkpoint import Checkpoint
    from quantkit.memory import LIMIT_ENV as MEMORY_ENV
    from quantkit.quantize.vllm import VllmSettings, export_vllm
    from quantkit.quantize.vllm.checks import offloaded_estimate
    from quantkit.quantize.vllm.layers import linear_layers
    from quantkit.targets import parse_target

    model = vllm_exports["model"]
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    target = "gptq:bits=4,group=64,actorder=weight"  # as the vllm_exports fixture made it
    s = VllmSettings(calib=calib, samples=4, seq_len=64, threads=2)
    with Checkpoint.open(model) as ck:
        cfg, wb = ck.config, ck.nbytes
    floor = offloaded_estimate(wb, cfg, parse_target(target), s, linear_layers(model)[1])
    monkeypatch.setenv(MEMORY_ENV, str(floor + 2**19))  # room for ~300 KB of weights
    res = export_vllm(model, [target], tmp_path / "gptq", s, python=py)
    assert res.plan.offload_cpu_bytes is not None
    assert any("rest on disk" in n for n in res.notes), res.notes
    a = res.artifacts[0].path
    ref = vllm_exports["gptq"]
    q = json.loads((a / "config.json").read_text())["quantization_config"]
    assert q == json.loads((ref / "config.json").read_text())["quantization_config"]
    got, want = _tensors(a), _tensors(ref)
    assert got.keys() == want.keys()
    for k in want:
        assert torch.equal(got[k], want[k]), k
    assert not list(a.parent.glob(".quantkit-llmc-*")), "the offload folder went with the work"
