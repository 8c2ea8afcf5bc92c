"""Every target kind from every source through one Target model and one dispatch: a PEFT model in
memory exports hf, fp8, Q8_0 and gptq in one call; the CLI on the saved base + adapter writes the
same weights; vLLM scores what it made."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
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

pytest.importorskip("peft")

from lora_helpers import make_adapter  # noqa: E402

TARGETS = ["hf", "fp8", "gguf:Q8_0", "gptq:group=64"]
SAME_AS_CLI = ("hf", "fp8-dynamic", "Q8_0")  # the deterministic ones


@pytest.fixture(scope="module")
def peft(tmp_path_factory):
    """A tiny Llama base, a LoRA adapter on it, the PEFT model in memory, calibration text."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("targets")
    base = make_tiny_model(root / "base", "LlamaForCausalLM")
    adapter = make_adapter(base, root / "adapter", r=8, lora_alpha=16)
    calib = root / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    pm = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), adapter
    )
    tok = AutoTokenizer.from_pretrained(base)
    return {"root": root, "base": base, "adapter": adapter, "calib": calib, "pm": pm, "tok": tok}


@pytest.fixture(scope="module")
def exported(peft):
    """Every kind from the model in memory in one call (llm-compressor for fp8 and gptq)."""
    import quantkit

    llmc_python_or_skip()
    res = quantkit.export(
        peft["pm"], TARGETS, peft["root"] / "api", tokenizer=peft["tok"], calib=peft["calib"],
        name="ft", samples=4, seq_len=64,
    )  # fmt: skip
    return {**peft, "res": res}


def test_in_memory_peft_writes_every_kind(exported):
    res = exported["res"]
    got = [(a.format, a.label) for a in res.artifacts]
    assert got == [("hf", "hf"), ("vllm", "fp8-dynamic"), ("gguf", "Q8_0"), ("vllm", "gptq-w4g64")]
    for a in res.artifacts:  # one record shape; a folder has one hash over its files
        assert a.path.exists() and a.size > 0 and len(a.sha256) == 64, a
        assert a.path.parent == exported["root"] / "api" and a.path.name.startswith("ft-")
    # the temporary merged copy llm-compressor and the importance matrix read is gone
    assert sorted(p.name for p in (exported["root"] / "api").iterdir()) == sorted(
        a.path.name for a in res.artifacts
    )
    assert json.dumps(res.to_json())


def test_hf_folder_gives_the_merged_models_logits(peft):
    """The hf folder is PEFT's merge (merge_and_unload on a copy) in float32, up to summation
    order; the unmerged forward (x W + s (x A) B) differs by about 2e-5."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    import quantkit

    res = quantkit.export(peft["pm"], "hf", peft["root"] / "hf-only", tokenizer=peft["tok"])
    x = torch.tensor([list(range(1, 60))])
    with torch.no_grad():
        want = copy.deepcopy(peft["pm"]).merge_and_unload()(x).logits[0].numpy()
        model = AutoModelForCausalLM.from_pretrained(res.artifacts[0].path, dtype=torch.float32)
        got = model(x).logits[0].numpy()
    assert float(np.max(np.abs(got - want))) <= 1e-5


def test_cli_on_base_and_adapter_writes_the_same_weights(exported):
    """`quantkit convert BASE --adapter DIR` and export(peft model) write the same tensors
    (names, dtypes, shapes, bytes) for every deterministic target."""
    root = exported["root"]
    out = root / "cli"
    r = run_cli(
        "convert", str(exported["base"]), "--adapter", str(exported["adapter"]), "--name", "ft",
        "--to", "hf", "--to", "fp8", "--to", "gguf:Q8_0", "--calib", str(exported["calib"]),
        "-o", str(out), "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    cli = {a["label"]: Path(a["path"]) for a in json.loads(r.stdout)["artifacts"]}
    api = {a.label: a.path for a in exported["res"].artifacts}
    for label in SAME_AS_CLI:
        assert _tensors(cli[label]) == _tensors(api[label]), label


def _tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    """name -> (dtype, shape, raw bytes) of a GGUF file or a safetensors folder."""
    if path.suffix == ".gguf":
        import gguf

        rd = gguf.GGUFReader(path)
        return {
            t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), bytes(t.data))
            for t in rd.tensors
        }
    import torch
    from safetensors import safe_open

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            for k in st.keys():
                t = st.get_tensor(k)
                raw = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                out[k] = (str(t.dtype), tuple(t.shape), raw)
    return out


def test_vllm_scores_hf_fp8_and_gptq(exported):
    """`quantkit validate` scores what export made in vLLM against the fine-tune (base +
    adapter); gptq where this host's measured matrix says W4A16 runs."""
    vllm_env_or_skip()
    root = exported["root"]
    arts = {a.label: a.path for a in exported["res"].artifacts}
    paths = [arts["hf"], arts["fp8-dynamic"], arts["gptq-w4g64"]]
    data = root / "eval.txt"
    data.write_text(TRAIN_TEXT)
    r, rep = validate_report(
        paths, exported["base"], data, root / "v.json", "--adapter", str(exported["adapter"]),
        "--engine", "vllm", "--pp", "8", "--tg", "2", "--vllm-eager",
    )  # fmt: skip
    assert rep, r.stderr
    by_path = {e["path"]: e for e in rep["artifacts"]}
    for e in rep["artifacts"]:
        print(Path(e["path"]).name, e["status"], (e.get("quality") or {}).get("kld_mean"))
    hf = by_path[str(arts["hf"])]
    assert hf["status"] == "ok" and hf["quality"]["kld_mean"] < 1e-3, hf
    for p in paths[1:]:
        e = by_path[str(p)]
        assert_scored_as_measured(e, p)
        if e["status"] == "ok":
            assert np.isfinite(e["quality"]["kld_mean"]), e


def test_one_parse_one_dispatch(tmp_path, monkeypatch):
    """From the command line to the builders: each --to is parsed once, each builder family is
    called once with all of its outputs, and each target reaches its builder as the object the
    parse made (no second parse, no copy)."""
    from click.testing import CliRunner

    from quantkit import targets
    from quantkit.cli import cli
    from quantkit.pipeline import build

    model = make_tiny_model(tmp_path / "m", "LlamaForCausalLM")
    parsed: list[str] = []
    made: list[object] = []
    real_parse = targets.parse_target

    def counting(spec):
        t = real_parse(spec)
        if isinstance(spec, str):
            parsed.append(spec)
            made.append(t)
        return t

    calls: list[tuple[str, list[str]]] = []
    reached: list[object] = []
    for family, fn in list(build.BUILDERS.items()):

        def record(src, outputs, o, fn=fn, family=family):
            calls.append((family, [x.target.label() for x in outputs]))
            reached.extend(x.target for x in outputs)
            return fn(src, outputs, o)

        monkeypatch.setitem(build.BUILDERS, family, record)
    monkeypatch.setattr(targets, "parse_target", counting)
    r = CliRunner().invoke(
        cli,
        ["convert", str(model), "--to", "gguf:F16", "--to", "Q8_0", "--to", "hf:bf16",
         "-o", str(tmp_path / "out")],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert parsed == ["gguf:F16", "Q8_0", "hf:bf16"]
    assert calls == [("gguf", ["F16", "Q8_0"]), ("hf", ["hf-bf16"])]
    assert [id(t) for t in reached] == [id(t) for t in made]


def test_calib_with_adapter_and_only_float_targets(peft):
    """--calib beside --adapter: a float-only run needs no importance matrix and is not refused."""
    out = peft["root"] / "f16.gguf"
    r = run_cli(
        "convert", str(peft["base"]), "--adapter", str(peft["adapter"]),
        "--to", "gguf:F16", "--calib", str(peft["calib"]), "-o", str(out),
    )  # fmt: skip
    assert r.returncode == 0 and out.is_file(), r.stderr
