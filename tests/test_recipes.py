"""Recipes and `quantkit run`: schema errors, cache reuse, resume after SIGTERM, --only + merge."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

VALIDATION = {"data": "text.txt", "ctx": 64, "chunks": 2, "threads": 2, "pp": 16, "tg": 4}


def _recipe(d: Path, name: str, targets: list[dict], **extra) -> Path:
    body = {
        "name": name,
        "source": {"model": "tiny"},
        "calibration": {"data": "text.txt", "ctx": 64, "chunks": 2},
        "output": str(d / f"out-{name}"),
        "targets": targets,
        **extra,
    }
    p = d / f"{name}.yaml"
    p.write_text(yaml.safe_dump(body, sort_keys=False))
    return p


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("recipes")
    make_tiny_model(d / "tiny", "LlamaForCausalLM")
    (d / "text.txt").write_text(TRAIN_TEXT * 3)
    return d


def _plan(recipe: Path, *extra: str) -> list[dict]:
    r = run_cli("run", str(recipe), "--plan", "--json", *extra)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.mark.parametrize(
    ("edit", "expect"),
    [
        (lambda b: b["targets"][1].update(type="Q9_X"), "targets[1].type: unknown GGUF type"),
        (lambda b: b["targets"][0].update(colour="red"), "targets[0].colour: Extra inputs"),
        (lambda b: b["calibration"].update(ctx=2), "calibration.ctx: Input should be greater"),
        (lambda b: b.pop("source"), "source: Field required"),
        (lambda b: b["targets"][1].update(name="q8"), "targets[1].name: 'q8' is used twice"),
        (lambda b: b["targets"][0].update(overrides=["x"]), "targets[0].overrides: bad"),
        (
            lambda b: b["targets"].append({"name": "a", "method": "gptq", "bits": 3}),
            "targets[2].bits",
        ),
        (
            lambda b: b["targets"].append({"name": "a", "method": "exl2"}),
            "targets[2].method: unknown",
        ),
        (
            lambda b: b.update(validation={"data": "t", "vllm": {"tensor_parallel_size": 0}}),
            "validation.vllm.tensor_parallel_size: Input should be greater",
        ),
        (
            lambda b: b.update(validation={"data": "t", "vllm": {"tp": 2}}),
            "validation.vllm.tp: Extra inputs",
        ),
    ],
)
def test_schema_errors_name_the_key(work: Path, edit, expect: str) -> None:
    body = {
        "name": "bad",
        "source": {"model": "tiny"},
        "calibration": {"data": "text.txt"},
        "targets": [{"name": "q8", "type": "Q8_0"}, {"name": "q4", "type": "Q4_K_M"}],
    }
    edit(body)
    p = work / "bad.yaml"
    p.write_text(yaml.safe_dump(body))
    r = run_cli("recipes", "validate", str(p))
    assert r.returncode == 2
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err
    assert expect.replace("Value error, ", "") in err, err


def test_vllm_layout_the_host_cannot_hold_is_refused_before_any_build(work: Path) -> None:
    """validation.vllm.tensor_parallel_size × pipeline_parallel_size beyond this host's cores
    (QUANTKIT_CUDA=0: a CPU host) stops the run before anything is built, in one line."""
    v = {**VALIDATION, "vllm": {"tensor_parallel_size": 512, "pipeline_parallel_size": 2}}
    p = _recipe(work, "tp", [{"name": "q8", "type": "Q8_0"}], validation=v)
    r = run_cli("run", str(p), env={"QUANTKIT_CUDA": "0"})
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "needs 1024 vLLM ranks" in err, err
    assert "--tensor-parallel-size 512 × --pipeline-parallel-size 2" in err, err
    assert not (work / "out-tp").exists() or not any((work / "out-tp").rglob("*.gguf"))


def test_hf_target_in_a_recipe_matches_convert(work: Path) -> None:
    """A recipe takes every Target kind the CLI does: an hf target is built through the same
    builder as `convert --to hf:bf16` (same tensors, same bytes) and its manifest names it."""
    p = _recipe(work, "hf", [{"name": "hf", "method": "hf", "dtype": "bf16"}])
    r = run_cli("run", str(p))
    assert r.returncode == 0, r.stderr
    m = json.loads((work / "out-hf" / "hf" / "manifest.json").read_text())
    assert (m["format"], m["type"], m["provenance"]["options"]["dtype"]) == (
        "hf",
        "hf-bf16",
        "bf16",
    )
    folder = work / "out-hf" / "hf" / m["artifact"]
    cli = work / "cli-hf"
    r = run_cli("convert", str(work / "tiny"), "--to", "hf:bf16", "-o", str(cli))
    assert r.returncode == 0, r.stderr
    got, want = (f / "model.safetensors" for f in (folder, cli))
    assert got.read_bytes() == want.read_bytes()


def test_adapter_targets_are_refused_in_recipes(work: Path) -> None:
    p = _recipe(work, "lora", [{"name": "l", "method": "gguf-lora"}])
    r = run_cli("recipes", "validate", str(p))
    assert r.returncode == 2 and "targets[0].method" in r.stderr and "adapter" in r.stderr


def test_shipped_recipes_list_and_laptop_validates() -> None:
    r = run_cli("recipes", "list")
    assert r.returncode == 0 and "laptop" in r.stdout and "release" in r.stdout
    r = run_cli("recipes", "validate", "laptop")
    assert r.returncode == 0, r.stderr
    assert "f16, q8, q6k, q4km" in r.stdout


def test_run_validates_then_second_run_does_no_work(work: Path) -> None:
    rec = _recipe(
        work,
        "ladder",
        [
            {"name": "f16", "type": "F16"},
            {"name": "q8", "type": "Q8_0"},
            {"name": "q4a", "type": "Q4_K_M", "imatrix": True, "validate": False},
            {"name": "q4b", "type": "Q4_K_S", "imatrix": True, "validate": False},
        ],
        validation=VALIDATION,
        gates={"max_kld": 1.0},
    )
    steps = _plan(rec)
    kinds = [(s["kind"], s["target"]) for s in steps]
    # the F16 base and the imatrix are shared: one step each for four targets
    assert kinds.count(("base", None)) == 1 and kinds.count(("imatrix", None)) == 1
    assert all(s["action"] == "build" for s in steps)
    r = run_cli("run", str(rec), "--only", "f16", "--only", "q8", "--only", "q4a", "--only", "q4b")
    assert r.returncode == 0, r.stderr
    out = work / "out-ladder"
    m = json.loads((out / "q8" / "manifest.json").read_text())
    assert m["format"] == "gguf" and m["type"] == "Q8_0" and len(m["sha256"]) == 64
    assert m["validation"]["passed"] and m["validation"]["quality"]["kld_mean"] < 1.0
    assert (out / "q8" / "report.png").stat().st_size > 0
    card = (out / "q8" / "README.md").read_text()
    assert m["sha256"] in card and "llama-cli" in card and "ollama create" in card
    q4 = json.loads((out / "q4a" / "manifest.json").read_text())
    assert q4["provenance"]["calibration_sha256"] is not None
    # the cached base is in the checkpoint's own precision (F32 here), as `convert` makes it
    (base,) = (out / ".cache").glob("base-*/*.gguf")
    assert base.name == "tiny-F32.gguf"
    run1 = json.loads((out / "run.json").read_text())
    assert sum(s["action"] == "build" for s in run1["steps"]) == len(steps)

    # nothing changed: every step is reused, and the run records that
    r = run_cli("run", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    assert [s["action"] for s in json.loads(r.stdout)["steps"]] == ["reuse"] * 6

    # a tampered artifact is not trusted: only its quantize + validate steps rebuild
    art = out / "q8" / "tiny-Q8_0.gguf"
    art.write_bytes(art.read_bytes()[:-1] + b"\x01")
    again = {(s["kind"], s["target"]): s["action"] for s in _plan(rec)}
    assert [k for k, a in again.items() if a == "build"] == [("quantize", "q8"), ("validate", "q8")]
    assert again[("base", None)] == "reuse"  # the cached base is not made again


def test_gate_failure_exits_1(work: Path) -> None:
    rec = _recipe(
        work,
        "strict",
        [{"name": "q4", "type": "Q4_0", "gates": {"max_kld": 0.0}}],
        validation=VALIDATION,
        gates={"max_kld": 5.0},
    )
    r = run_cli("run", str(rec))
    assert r.returncode == 1, r.stderr
    assert "q4 --max-kld 0" in r.stderr


def test_unscored_artifact_fails_and_is_retried(work: Path) -> None:
    rec = _recipe(
        work,
        "timeout",
        [{"name": "q8", "type": "Q8_0"}],
        validation={**VALIDATION, "timeout": 0.01},
    )
    r = run_cli("run", str(rec))
    assert r.returncode == 2 and "could not be scored: q8" in r.stderr, r.stderr
    acts = {(s["kind"], s["target"]): s["action"] for s in _plan(rec)}
    # the artifact is kept (no base step needed); only its validation runs again
    assert acts == {("quantize", "q8"): "reuse", ("validate", "q8"): "build"}


def test_too_slow_target_fails_the_run_and_is_kept_for_this_host(work: Path) -> None:
    """validation.max_minutes: a target past its budget is reported too-slow with its rate, the
    run exits 1 with a hint, and on this host the verdict is not measured again."""
    rec = _recipe(
        work,
        "budget",
        [{"name": "q8", "type": "Q8_0"}],
        # 30 ms: less than a worker process needs to import numpy and llama.cpp, so the budget
        # passes before the first chunk on any host (a tiny model scores 2 chunks in ~4 ms)
        validation={**VALIDATION, "max_minutes": 0.0005},
    )
    r = run_cli("run", str(rec))
    assert r.returncode == 1, r.stderr
    assert "q8: too slow for the 0.0005-minute budget: no chunk" in r.stderr, r.stderr
    assert "max_minutes" in r.stderr
    assert "TOO SLOW" in r.stdout
    m = json.loads((work / "out-budget" / "q8" / "manifest.json").read_text())
    assert m["validation"]["too_slow_artifacts"] and m["validation"]["quality"] is None
    acts = {(s["kind"], s["target"]): s["action"] for s in _plan(rec)}
    assert acts == {("quantize", "q8"): "reuse", ("validate", "q8"): "reuse"}


def test_sigterm_then_resume(work: Path) -> None:
    targets = [{"name": f"t{i}", "type": t} for i, t in enumerate(["Q8_0", "Q6_K", "Q5_K_M"])]
    rec = _recipe(work, "resume", targets, validation=VALIDATION)
    out = work / "out-resume"
    env = {**os.environ}
    env.pop("QUANTKIT_DEBUG", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "quantkit.cli", "run", str(rec)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 120
    while not (out / "t0" / "manifest.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0, err
    # nothing half-written: no temporary files left next to the outputs
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".quantkit")]
    r = run_cli("run", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout)["steps"]
    acts = {(s["kind"], s["target"]): s["action"] for s in steps}
    assert acts[("quantize", "t0")] == "reuse"  # finished before the signal: kept
    assert "build" in acts.values()  # the rest was done now
    assert all(a == "reuse" for a in (s["action"] for s in _plan(rec)))


def test_only_jobs_merge_byte_identical(work: Path) -> None:
    rec = _recipe(
        work,
        "ci",
        [{"name": "q8", "type": "Q8_0"}, {"name": "q4", "type": "Q4_0"}],
        validation=VALIDATION,
    )
    jobs = []
    for name in ("q8", "q4"):
        # each CI job has its own output (here: its own copy of the recipe)
        body = yaml.safe_load(rec.read_text())
        body["output"] = str(work / f"job-{name}")
        p = work / f"ci-{name}.yaml"
        p.write_text(yaml.safe_dump(body))
        r = run_cli("run", str(p), "--only", name)
        assert r.returncode == 0, r.stderr
        jobs.append(work / f"job-{name}")
    r1 = run_cli("report", "merge", str(jobs[0]), str(jobs[1]), "-o", str(work / "m1"))
    r2 = run_cli("report", "merge", str(jobs[1]), str(jobs[0]), "-o", str(work / "m2"))
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    for f in ("manifest.json", "report.json", "report.md"):
        assert (work / "m1" / f).read_bytes() == (work / "m2" / f).read_bytes(), f
    # single target folders (what a CI job uploads) merge to the same bytes
    r3 = run_cli(
        "report", "merge", str(jobs[1] / "q4"), str(jobs[0] / "q8"), "-o", str(work / "m3")
    )
    assert r3.returncode == 0, r3.stderr
    for f in ("manifest.json", "report.json"):
        assert (work / "m1" / f).read_bytes() == (work / "m3" / f).read_bytes(), f
    merged = json.loads((work / "m1" / "report.json").read_text())
    assert len(merged["artifacts"]) == 2
    names = [
        a["target"] for a in json.loads((work / "m1" / "manifest.json").read_text())["artifacts"]
    ]
    assert names == ["q4", "q8"]
    r = run_cli("run", str(rec), "--only", "nope")
    assert r.returncode == 2 and "--only nope: no such target" in r.stderr


def test_vllm_fp8_target_built_and_reused(work: Path) -> None:
    """A vLLM target in a recipe goes through llm-compressor (its own env) and is cached too."""
    from quantkit import envs
    from quantkit.errors import EngineError

    try:
        envs.python("llmcompressor")
    except EngineError as e:
        pytest.skip(f"llmcompressor environment absent: {e}")
    rec = _recipe(work, "fp8", [{"name": "fp8", "method": "fp8", "scheme": "dynamic"}])
    r = run_cli("run", str(rec), "--json")
    assert r.returncode == 0, r.stderr
    m = json.loads((work / "out-fp8" / "fp8" / "manifest.json").read_text())
    assert m["format"] == "vllm" and m["type"] == "fp8-dynamic" and len(m["sha256"]) == 64
    cfg = json.loads((work / "out-fp8" / "fp8" / "tiny-fp8-dynamic" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "compressed-tensors"
    assert "vllm serve" in (work / "out-fp8" / "fp8" / "README.md").read_text()
    assert [s["action"] for s in _plan(rec)] == ["reuse"]


def test_recipe_quantizes_from_the_checkpoints_own_precision(work: Path) -> None:
    """A BF16 checkpoint with a weight beyond the F16 range (±65504) converts on the CLI, and
    in a recipe too: both quantize from a base in the checkpoint's own precision (BF16 here),
    so the same targets make the same bytes."""
    import torch
    from safetensors.torch import load_file, save_file

    src = make_tiny_model(work / "bf16", "LlamaForCausalLM", dtype="bfloat16")
    t = load_file(src / "model.safetensors")
    t["model.layers.1.self_attn.o_proj.weight"][3, 5] = 1e5
    save_file(t, src / "model.safetensors", metadata={"format": "pt"})
    assert t["model.layers.1.self_attn.o_proj.weight"].dtype == torch.bfloat16
    cli = work / "cli-bf16"
    r = run_cli("convert", str(src), "--to", "gguf:Q8_0", "--to", "gguf:BF16", "-o", str(cli))
    assert r.returncode == 0, r.stderr
    rec = _recipe(
        work,
        "bf16",
        [{"name": "q8", "type": "Q8_0"}, {"name": "bf16", "type": "BF16"}],
        source={"model": "bf16"},
    )
    r = run_cli("run", str(rec))
    assert r.returncode == 0, r.stderr
    out = work / "out-bf16"
    for name, label in (("q8", "Q8_0"), ("bf16", "BF16")):
        got = (out / name / f"bf16-{label}.gguf").read_bytes()
        assert got == (cli / f"bf16-{label}.gguf").read_bytes(), label
    # the cached base is the checkpoint's own precision, and the BF16 target is that base
    (base,) = (out / ".cache").glob("base-*/*.gguf")
    assert (
        base.name == "bf16-BF16.gguf" and base.read_bytes() == (cli / "bf16-BF16.gguf").read_bytes()
    )
