"""Each decision made once: where outputs go (pipeline/build.py ``place``), how ``--to`` reads
(quantkit/targets.py), what an artifact is (validate/describe.py). Fast: no engine starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import make_tiny_model

from quantkit.errors import InputError
from quantkit.pipeline import build
from quantkit.pipeline.build import place
from quantkit.targets import KINDS, GGUFTarget, parse_target, parse_targets


def _names(outputs: list) -> list[tuple[str, str | None]]:
    return [(x.path.name, x.layout) for x in outputs]


def test_place_names_every_output_of_a_mixed_list(tmp_path: Path) -> None:
    ts = parse_targets(["Q8_0", "gguf:auto:size=1MB", "gguf-lora", "vllm-lora", "gptq", "hf:bf16"])
    outs = place(ts, tmp_path, "m", layouts=("compressed-tensors", "legacy"))
    assert _names(outs) == [
        ("m-Q8_0.gguf", None),
        ("m-AUTO-1000000B.gguf", None),
        ("m-lora-F32.gguf", None),
        ("m-vllm-lora", None),
        ("m-gptq-w4g128", "compressed-tensors"),
        ("m-gptq-w4g128-legacy", "legacy"),
        ("m-hf-bf16", None),
    ]
    assert all(x.path.parent == tmp_path for x in outs)
    assert [x.target for x in outs][:4] == ts[:4]  # the parsed objects themselves
    assert all(x.target is ts[4] for x in outs[4:6])


def test_place_out_names_the_one_output_itself(tmp_path: Path) -> None:
    one = parse_targets(["gguf:F16"])
    assert place(one, tmp_path / "x.gguf", "m")[0].path == tmp_path / "x.gguf"
    assert place(one, tmp_path / "d", "m")[0].path == tmp_path / "d" / "m-F16.gguf"
    assert place(parse_targets(["hf"]), tmp_path / "h", "m")[0].path == tmp_path / "h"
    assert place(parse_targets(["fp8"]), tmp_path / "v", "m")[0].path == tmp_path / "v"
    # a vLLM adapter folder always goes inside -o; out_is_dir (quantkit.export) too
    assert place(parse_targets(["vllm-lora"]), tmp_path, "m")[0].path == tmp_path / "m-vllm-lora"
    assert place(parse_targets(["hf"]), tmp_path, "m", out_is_dir=True)[0].path == tmp_path / "m-hf"
    legacy = place(parse_targets(["fp8"]), tmp_path, "m", layouts=("legacy", "legacy"))
    assert _names(legacy) == [(tmp_path.name, "legacy")]  # one output: -o itself
    both = place(parse_targets(["fp8"]), tmp_path, "m", layouts=("legacy", "compressed-tensors"))
    assert _names(both) == [
        ("m-fp8-dynamic-legacy", "legacy"),
        ("m-fp8-dynamic", "compressed-tensors"),
    ]
    assert place(one, None, "m")[0].path == Path.cwd() / "m-F16.gguf"
    for specs in (["F16", "Q8_0"], ["hf"], ["vllm-lora"]):
        with pytest.raises(InputError, match="GGUF file"):
            place(parse_targets(specs), tmp_path / "x.gguf", "m")


def test_paths_and_stem_are_decided_once_per_build(tmp_path: Path, monkeypatch) -> None:
    """A mixed --to list through the CLI: place() and Source.stem() run once each, and every
    artifact is written where place() said, carrying the output place() made for it."""
    from quantkit.cli import cli

    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    placed: list[list] = []
    stems: list[str] = []
    real_place, real_stem = build.place, build.Source._decide_stem

    def counting_place(*a, **k):
        placed.append(real_place(*a, **k))
        return placed[-1]

    def counting_stem(self):
        stems.append(real_stem(self))
        return stems[-1]

    monkeypatch.setattr(build, "place", counting_place)
    monkeypatch.setattr(build.Source, "_decide_stem", counting_stem)
    out = tmp_path / "out"
    r = CliRunner().invoke(
        cli, ["convert", str(model), "--to", "hf", "--to", "F16", "--to", "Q8_0", "-o", str(out),
              "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert len(placed) == 1 and len(stems) == 1
    got = [a["path"] for a in json.loads(r.stdout)["artifacts"]]
    assert got == [str(x.path) for x in placed[0]]  # in the order asked: hf first
    assert [Path(p).name for p in got] == ["m-hf", "m-F16.gguf", "m-Q8_0.gguf"]


def test_gguf_auto_is_parsed_once(monkeypatch) -> None:
    """gguf:auto text → GGUFTarget is the only parse; the planner's AutoSpec is a field copy."""
    from quantkit import targets
    from quantkit.quantize.gguf.auto import spec

    t = parse_target("gguf:auto:bpw=4.5:types=q4_k,Q8_0")

    def refuse(*a, **k):
        raise AssertionError("parsed again")

    monkeypatch.setattr(spec, "parse_auto", refuse)
    monkeypatch.setattr(targets, "parse_target", refuse)
    a = t.auto_spec()
    assert (a.bpw, a.size, a.types, a.name) == (4.5, None, ("Q4_K", "Q8_0"), "AUTO-4.5BPW")


def test_every_kind_is_one_model_with_its_family() -> None:
    """The kinds, their families and hints come from the models: nothing to keep in step."""
    for method, model in KINDS.items():
        assert model.family in build.BUILDERS, method
        assert model.model_fields["method"].annotation is not None
    assert set(KINDS) >= {"gguf", "gguf-lora", "vllm-lora", "gptq", "awq", "fp8", "gptq-auto", "hf"}
    # one grammar for every kind: main option, lists, booleans, KIND:auto
    assert parse_target("gguf:auto:size=90MB:types=Q4_K,Q5_K").types == ("Q4_K", "Q5_K")
    assert parse_target("gptq:auto:bits=5:types=w8g128,w4g64:force").force
    assert parse_target("hf:f16,shard=2GB").shard == 2 * 10**9
    assert parse_target("fp8:block").scheme == "block"
    assert isinstance(parse_target("q4_k_m"), GGUFTarget)
    with pytest.raises(InputError, match="given twice"):
        parse_target("gptq:bits=4,bits=8")


def test_describe_reads_a_folder_once(tmp_path: Path, monkeypatch) -> None:
    """Engine, capability rows and report label of one vLLM folder: config.json read once."""
    from quantkit.validate import describe as d
    from quantkit.validate.capabilities import format_of, rows_of
    from quantkit.validate.engines import engine_for, hf_file_type, hf_quant_method

    folder = tmp_path / "ct"
    folder.mkdir()
    q = {
        "quant_method": "compressed-tensors",
        "config_groups": {
            "a": {"weights": {"type": "int", "num_bits": 4, "group_size": 64}},
            "b": {"weights": {"type": "int", "num_bits": 8, "group_size": 128}},
        },
    }
    (folder / "config.json").write_text(json.dumps({"dtype": "bfloat16", "quantization_config": q}))
    reads: list[Path] = []
    real = d.json_or_none
    monkeypatch.setattr(d, "json_or_none", lambda p: reads.append(p) or real(p))
    d._describe.cache_clear()
    assert engine_for(folder) == "vllm"
    assert hf_quant_method(folder) == "compressed-tensors"
    assert format_of(folder) == "w4a16-g64:bf16"
    assert rows_of(folder) == ["w4a16-g64:bf16", "w8a16-g128:bf16"]
    assert hf_file_type(folder) == "W4A16 g64+W8A16 g128"
    assert reads == [folder / "config.json"]
