"""INT8 W8A8 (SmoothQuant + GPTQ) and FP4 (NVFP4, MXFP4) checkpoints for vLLM: the targets, their
llm-compressor recipes, the checkpoints they write, and how validate scores them — where this
host's measured capability row says vLLM runs the format, else "unsupported" with vLLM's reason."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    TRAIN_TEXT,
    assert_scored_as_measured,
    llmc_python_or_skip,
    make_tiny_model,
    run_cli,
    validate_report,
    vllm_env_or_skip,
)

from quantkit.targets import parse_target


def test_targets_parse_to_their_recipes() -> None:
    i8 = parse_target("int8")
    r = i8.to_recipe()
    assert i8.label() == "w8a8-int8" and i8.needs_calibration
    assert r["weights"]["strategy"] == "channel" and r["weights"]["num_bits"] == 8
    assert r["activations"] == {"num_bits": 8, "type": "int", "symmetric": True,
                                "strategy": "token", "dynamic": True}  # fmt: skip
    assert r["smoothing"] == 0.8
    st = parse_target("int8:static,smoothing=0.5")
    assert st.label() == "w8a8-int8-static" and st.to_recipe()["smoothing"] == 0.5
    assert st.to_recipe()["activations"]["strategy"] == "tensor"
    assert not st.to_recipe()["activations"]["dynamic"]
    assert parse_target("int8:smoothing=0").to_recipe()["smoothing"] == 0
    for spec, label, preset, calib in (
        ("nvfp4", "nvfp4", "NVFP4", True),  # the activations' per-tensor scale is observed
        ("nvfp4:a16", "nvfp4-a16", "NVFP4A16", False),
        ("mxfp4", "mxfp4", "MXFP4", False),  # activation scales at run time
        ("mxfp4:a16", "mxfp4-a16", "MXFP4A16", False),
    ):
        t = parse_target(spec)
        assert (t.label(), t.to_recipe()["preset"], t.needs_calibration) == (label, preset, calib)
    # recipes write the same fields
    from quantkit.targets import target_from_dict

    assert target_from_dict({"method": "nvfp4", "activations": "a16"}) == parse_target("nvfp4:a16")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int8:smoothing=1.5", "smoothing"),
        ("int8:bits=4", "unknown option 'bits'"),
        ("nvfp4:a8", "activations"),
    ],
)
def test_bad_options_are_refused(spec: str, message: str) -> None:
    from quantkit.errors import InputError

    with pytest.raises(InputError, match=message):
        parse_target(spec)


def test_calibration_and_layout_refused_before_work(tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM", dtype="bfloat16")
    r = run_cli("convert", str(model), "--to", "int8", "-o", str(tmp_path / "o"))
    assert r.returncode == 2 and "w8a8-int8 need calibration text" in r.stderr, r.stderr
    calib = tmp_path / "c.txt"
    calib.write_text(TRAIN_TEXT)
    r = run_cli("convert", str(model), "--to", "nvfp4:a16", "--layout", "legacy",
                "--calib", str(calib), "-o", str(tmp_path / "o"))  # fmt: skip
    assert r.returncode == 2 and "nvfp4 has no legacy layout" in r.stderr, r.stderr
    assert not (tmp_path / "o").exists()


@pytest.fixture(scope="module")
def exports(tmp_path_factory) -> dict[str, Path]:
    """A tiny bf16 Llama exported to int8 and nvfp4 in one llm-compressor process."""
    py = llmc_python_or_skip()
    from quantkit.quantize.vllm import VllmSettings, export_vllm

    root = tmp_path_factory.mktemp("int8-fp4")
    model = make_tiny_model(root / "tiny", "LlamaForCausalLM", dtype="bfloat16")
    calib = root / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    s = VllmSettings(calib=calib, samples=4, seq_len=64, threads=2)
    res = export_vllm(model, ["int8", "nvfp4"], root / "out", s, python=py)
    from quantkit.convert import convert

    gguf = convert(model, ["gguf:NVFP4"], root / "gguf").artifacts[0].path
    return {"model": model, "calib": calib, "gguf-nvfp4": gguf,
            **{a.type: a.path for a in res.artifacts}}  # fmt: skip


def test_checkpoints_are_what_vllm_reads(exports: dict[str, Path]) -> None:
    from quantkit.validate.capabilities import format_of

    q = json.loads((exports["w8a8-int8"] / "config.json").read_text())["quantization_config"]
    g = q["config_groups"]["group_0"]
    assert q["format"] == "int-quantized"
    assert g["weights"]["strategy"] == "channel" and g["input_activations"]["strategy"] == "token"
    assert format_of(exports["w8a8-int8"]) == "w8a8-int8:bf16"
    q = json.loads((exports["nvfp4"] / "config.json").read_text())["quantization_config"]
    assert q["format"] == "nvfp4-pack-quantized"
    assert q["config_groups"]["group_0"]["weights"]["group_size"] == 16
    assert format_of(exports["nvfp4"]) == "nvfp4:bf16"


def test_int8_and_nvfp4_scored_as_this_host_measured(
    exports: dict[str, Path], tmp_path: Path
) -> None:
    """One validate run: each artifact scored where its row runs here (INT8 W8A8 on an x86 CPU,
    with the linear kernel vLLM picked in the report), else "unsupported" with vLLM's reason;
    the NVFP4 GGUF of the same model beside the NVFP4 checkpoint (the cross-engine pair)."""
    vllm_env_or_skip()
    arts = [exports["w8a8-int8"], exports["nvfp4"], exports["gguf-nvfp4"]]
    text = tmp_path / "t.txt"
    text.write_text(TRAIN_TEXT * 4)
    r, rep = validate_report(arts, exports["model"], text, tmp_path / "r.json", "--vllm-eager")
    assert rep, r.stdout + r.stderr
    by = {Path(a["path"]).name: a for a in rep["artifacts"]}
    for p in arts[:2]:
        assert_scored_as_measured(by[p.name], p)
    g = by[exports["gguf-nvfp4"].name]
    assert g["status"] == "ok" and g["size"]["file_type"] == "NVFP4", g  # llama.cpp runs it here
    assert g["size"]["type_histogram"]["NVFP4"] >= 14
    a = by[exports["w8a8-int8"].name]
    if a["status"] == "ok":
        assert a["size"]["file_type"] == "W8A8 INT8"
        assert 8 < a["size"]["bits_per_weight"] < 16  # int8 layers, float embeddings
        assert a["engine"]["kernels"], a["engine"]  # vLLM logged the int8 kernel it picked


def test_gptq_auto_offers_int8_w8a8() -> None:
    """gptq:auto takes int8 (W8A8) as a candidate: its config group carries per-token int8
    activations, its cost is the int8 weight plus one scale per output channel, and its
    capability row is the one --to int8 measures."""
    from quantkit.quantize.vllm.auto.plan import config_groups
    from quantkit.quantize.vllm.auto.schemes import DEFAULT_TYPES, scheme
    from quantkit.quantize.vllm.auto.spec import parse_vllm_auto

    assert "int8" in DEFAULT_TYPES
    assert parse_vllm_auto("gptq:auto:bits=6:types=w4g64,int8").types == ("w4g64", "int8")
    s = scheme("int8")
    assert s is not None and s.fits(576) and s.capability_row("bf16") == "w8a8-int8:bf16"
    assert s.cost_bits(256, 512, 16) == 256 * 512 * 8 + 256 * 16
    groups, floats = config_groups({"w4g64": ["a.q_proj"], "int8": ["a.down_proj"], "float": []})
    g4, g8 = groups["group_0"], groups["group_1"]  # int weights-only first (module doc there)
    assert "input_activations" not in g4
    assert g8["weights"] == parse_target("int8").to_recipe()["weights"]
    assert g8["input_activations"] == parse_target("int8").to_recipe()["activations"]
    assert floats == []


def test_cards_and_reports_name_format_bits_and_kernel() -> None:
    from quantkit.pipeline.cards import _format_line
    from quantkit.validate.report import notes

    entry = {
        "name": "m-w8a8-int8",
        "size": {"file_type": "W8A8 INT8", "bits_per_weight": 9.453},
        "engine": {"kernels": ["CPUInt8ScaledMMLinearKernel (model.layers.0.mlp.down_proj)"]},
    }
    line = _format_line(entry, {"type": "w8a8-int8"})
    assert line.startswith("Format: W8A8 INT8, 9.453 bits per weight")
    assert "CPUInt8ScaledMMLinearKernel" in line
    assert _format_line({"size": {}}, {"type": "Q4_K_M"}) == "Format: Q4_K_M."
    out = notes({"artifacts": [entry]})
    assert out == ["m-w8a8-int8: linear kernels: " + entry["engine"]["kernels"][0]]
