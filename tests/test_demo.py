"""`quantkit demo`: the shipped `demo` recipe (recipes/demo.yaml) through `quantkit run`'s pipeline.

The full demo on the embedded model takes minutes (README and docs/cli.md "quantkit demo" give the
measured times), so the tests check its plan on the embedded model and run the path end to end on a tiny model with
two of its targets: a GGUF Q8_0 scored in llama.cpp and the W4A16 GPTQ checkpoint validated in
vLLM. Whether this host's vLLM runs W4A16 is measured (validate/capabilities.py): where its row cannot run, the demo's row must say so with the measured reason and
the demo must still exit 0; where it runs it is scored. One llm-compressor run and one vLLM start
for the module (plus the capability row's own, once per host).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (
    assert_scored_as_measured,
    host_verdict,
    llmc_python_or_skip,
    make_tiny_model,
    run_cli,
    vllm_env_or_skip,
)

DEMO_TARGETS = ["q8", "q4km", "iq4xs", "fp8", "w4"]


def test_demo_plan_on_the_embedded_model(demo_model_dir: Path, tmp_path: Path) -> None:
    """Nothing built yet: the shared F16 base and imatrix, then every target built and validated."""
    r = run_cli("demo", "--plan", "--json", "-o", str(tmp_path / "demo"))
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)
    assert [(s["kind"], s["target"]) for s in steps[:2]] == [("base", None), ("imatrix", None)]
    assert [s["target"] for s in steps if s["kind"] == "quantize"] == DEMO_TARGETS
    assert [s["target"] for s in steps if s["kind"] == "validate"] == DEMO_TARGETS
    assert {s["action"] for s in steps} == {"build"}
    paths = {s["target"]: Path(s["path"]) for s in steps if s["kind"] == "quantize"}
    assert paths["iq4xs"].name == "smollm2-135m-instruct-IQ4_XS.gguf"
    assert paths["fp8"].name == "smollm2-135m-instruct-fp8-dynamic"  # a checkpoint folder
    assert paths["w4"].name == "smollm2-135m-instruct-gptq-w4g64"
    assert all(p.is_relative_to(tmp_path / "demo") for p in paths.values())


def test_demo_model_argument_must_be_a_model(tmp_path: Path) -> None:
    r = run_cli("demo", str(tmp_path), "--plan")
    assert r.returncode == 2 and "not a Hugging Face model folder" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    vllm_env_or_skip()
    llmc_python_or_skip()
    d = tmp_path_factory.mktemp("demo")
    model = make_tiny_model(d / "tiny", "LlamaForCausalLM", dtype="float16")
    out = d / "out"
    args = ("demo", str(model), "-o", str(out), "--only", "q8", "--only", "w4")
    plan = run_cli(*args, "--plan", "--json")
    first = run_cli(*args, timeout=900)
    second = run_cli(*args, "--json")
    return {"out": out, "plan": plan, "first": first, "second": second}


def test_tiny_demo_runs_gguf_and_w4(tiny_demo: dict) -> None:
    r, out = tiny_demo["first"], tiny_demo["out"]
    assert r.returncode == 0, r.stdout + r.stderr
    steps = json.loads(tiny_demo["plan"].stdout)
    assert [s["target"] for s in steps if s["kind"] == "quantize"] == ["q8", "w4"]
    assert not any(s["kind"] == "imatrix" for s in steps)  # only the chosen targets' inputs
    rep = json.loads((out / "report.json").read_text())
    q8, w4 = rep["artifacts"]
    assert q8["status"] == "ok" and q8["engine"]["name"] == "llama.cpp", q8
    assert (out / "report.png").stat().st_size > 0 and (out / "report.md").is_file()
    assert f"chart: {out / 'report.png'}" in r.stdout
    manifest = json.loads((out / "w4" / "manifest.json").read_text())
    assert manifest["format"] == "vllm" and manifest["type"] == "gptq-w4g64"
    assert_scored_as_measured(w4, Path(w4["path"]))
    if w4["status"] == "ok":
        assert w4["engine"]["name"] == "vllm", w4
        assert rep["unsupported_artifacts"] == []
    else:
        # built, not scorable here: not a failure, one line with the measured reason
        assert rep["unsupported_artifacts"] == [w4["name"]] and rep["failed_artifacts"] == []
        assert rep["passed"] is True
        line = next(ln for ln in r.stdout.splitlines() if ln.startswith("w4 "))
        assert "n/a (host)" in line, r.stdout
        assert "not scorable on this host: " + host_verdict(Path(w4["path"])).reason in r.stdout
        assert "w4: built, not scorable on this host" in r.stderr
        assert "not scorable" in (out / "w4" / "README.md").read_text()
    print("\n" + r.stdout)


def test_tiny_demo_second_run_reuses_everything(tiny_demo: dict) -> None:
    """Including the W4 verdict on this host: no second llm-compressor run nor vLLM start."""
    r = tiny_demo["second"]
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout)
    assert {s["action"] for s in res["steps"]} == {"reuse"}, res["steps"]
    assert res["failed_artifacts"] == []
    arts = json.loads((tiny_demo["out"] / "report.json").read_text())["artifacts"]
    w4 = next(a for a in arts if a["name"].endswith("gptq-w4g64"))
    v = host_verdict(Path(w4["path"]))  # the measured row, not this run's own report
    assert [u["target"] for u in res["unsupported"]] == ([] if v.runs or v.fix else ["w4"])
