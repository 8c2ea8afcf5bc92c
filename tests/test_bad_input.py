"""Bad input: one line on stderr naming the problem and what to do, exit 2, nothing at the output."""

from __future__ import annotations

import json
import pickle
import shutil
import struct
from pathlib import Path

import pytest
from conftest import like_a_terminal, make_tiny_model, run_cli

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("good") / "m", "LlamaForCausalLM", **SMALL)


@pytest.fixture
def model(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def _tensors(model: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(model / "model.safetensors")


def _save(model: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, model / "model.safetensors", metadata={"format": "pt"})


def convert_fails(model: Path, out: Path, *extra: str) -> str:
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out), *extra)
    assert r.returncode == 2, (r.returncode, r.stderr)
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr  # one line, no traceback
    assert "Traceback" not in r.stderr
    assert not out.exists(), "output written despite the error"
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".part")], (
        "temporary left behind"
    )
    return lines[0]


def test_valid_model_converts(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "ok.gguf"
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.stat().st_size > 0


def test_missing_config(model: Path, tmp_path: Path) -> None:
    (model / "config.json").unlink()
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "no config.json" in msg and "Hugging Face model folder" in msg


def test_missing_model_dir(tmp_path: Path) -> None:
    msg = convert_fails(tmp_path / "nope", tmp_path / "o.gguf")
    assert "no such model directory" in msg


def test_unsupported_architecture(model: Path, tmp_path: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["FancyNetForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "'FancyNetForCausalLM' is not supported" in msg
    for name in ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert name in msg


def test_remote_code_architecture_refused(model: Path, tmp_path: Path) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg["architectures"] = ["MyModel"]
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_my.MyModel"}
    (model / "config.json").write_text(json.dumps(cfg))
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "custom code" in msg and "never runs code" in msg


def test_broken_config_json(model: Path, tmp_path: Path) -> None:
    (model / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "config.json is not valid JSON" in msg


def test_missing_tensor(model: Path, tmp_path: Path) -> None:
    t = _tensors(model)
    del t["model.layers.1.mlp.up_proj.weight"]
    _save(model, t)
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "missing tensors: model.layers.1.mlp.up_proj.weight" in msg


def test_misshaped_tensor(model: Path, tmp_path: Path) -> None:
    import numpy as np

    t = _tensors(model)
    t["model.layers.0.self_attn.k_proj.weight"] = np.zeros((64, 64), dtype=np.float32)
    _save(model, t)
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert (
        "mis-shaped tensors: model.layers.0.self_attn.k_proj.weight is [64, 64], expected [32, 64]"
        in msg
    )


def test_truncated_safetensors(model: Path, tmp_path: Path) -> None:
    f = model / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "model.safetensors" in msg and "truncated" in msg


def test_lying_header_length(model: Path, tmp_path: Path) -> None:
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[:8] = struct.pack("<Q", 10**15)
    f.write_bytes(bytes(data))
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "header length" in msg


def test_malformed_safetensors_header(model: Path, tmp_path: Path) -> None:
    f = model / "model.safetensors"
    data = bytearray(f.read_bytes())
    (hlen,) = struct.unpack("<Q", data[:8])
    data[8:16] = b"not json"
    f.write_bytes(bytes(data))
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "header is not valid JSON" in msg


def test_missing_shard(model: Path, tmp_path: Path) -> None:
    idx = {
        "metadata": {},
        "weight_map": {"model.embed_tokens.weight": "model-00002-of-00002.safetensors"},
    }
    (model / "model.safetensors.index.json").write_text(json.dumps(idx))
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "model-00002-of-00002.safetensors" in msg and "missing" in msg


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickle_only(model: Path) -> None:
    (model / "model.safetensors").unlink()


def test_pickle_only_refused(model: Path, tmp_path: Path) -> None:
    import torch

    marker = tmp_path / "pwned"
    _pickle_only(model)
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": _Payload(str(marker))}, f)
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "pickle" in msg and "--allow-pickle" in msg
    assert not marker.exists()
    # even when allowed, weights_only=True refuses the payload
    msg = convert_fails(model, tmp_path / "o.gguf", "--allow-pickle")
    assert "weights_only" in msg
    assert not marker.exists()
    del torch


def test_pickle_allowed_converts(model: Path, tmp_path: Path) -> None:
    import torch
    from safetensors.torch import load_file

    ref = tmp_path / "s.gguf"
    assert run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(ref)).returncode == 0
    sd = load_file(model / "model.safetensors")
    _pickle_only(model)
    torch.save(sd, model / "pytorch_model.bin")
    out = tmp_path / "p.gguf"
    assert run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out)).returncode == 2
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out), "--allow-pickle")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == ref.read_bytes()


def test_existing_output_refused_without_force(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "o.gguf"
    out.write_bytes(b"precious")
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out))
    assert r.returncode == 2
    assert "already exists" in r.stderr and "--force" in r.stderr
    assert out.read_bytes() == b"precious"
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out), "--force")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes()[:4] == b"GGUF"


def test_unknown_type(model: Path, tmp_path: Path) -> None:
    r = run_cli("convert", str(model), "--to", "gguf:Q9_9", "-o", str(tmp_path / "o.gguf"))
    assert r.returncode == 2 and "unknown GGUF type 'Q9_9'" in r.stderr


def test_nan_weight(model: Path, tmp_path: Path) -> None:
    import numpy as np

    t = _tensors(model)
    t["model.layers.1.self_attn.o_proj.weight"][3, 5] = np.nan
    _save(model, t)
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "model.layers.1.self_attn.o_proj.weight" in msg and "NaN" in msg


def test_f16_overflow_suggests_bf16(model: Path, tmp_path: Path) -> None:
    t = _tensors(model)
    t["model.layers.0.mlp.down_proj.weight"][0, 0] = 1e6
    _save(model, t)
    msg = convert_fails(model, tmp_path / "o.gguf")
    assert "beyond the F16 range" in msg and "BF16" in msg
    r = run_cli("convert", str(model), "--to", "gguf:BF16", "-o", str(tmp_path / "b.gguf"))
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_interrupted_conversion_leaves_nothing(
    demo_model_dir: Path, tmp_path: Path, signame: str
) -> None:
    """SIGTERM or SIGINT (Ctrl-C) in the middle of writing: exit 130, no final file, no temporary."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "out"
    out.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "QUANTKIT_DEBUG"}
    p = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "quantkit.cli",
            "convert",
            str(demo_model_dir),
            "--to",
            "F32",
            "--to",
            "BF16",
            "--to",
            "Q8_0",
            "-o",
            str(out),
        ],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=like_a_terminal,
    )
    deadline = time.time() + 60
    while time.time() < deadline and not any(out.glob("*.part")):
        time.sleep(0.005)
    assert any(out.glob("*.part")), "conversion never started writing"
    p.send_signal(getattr(signal, signame))
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "interrupted" in err
    assert list(out.iterdir()) == [], [x.name for x in out.iterdir()]


@pytest.mark.parametrize(
    "given", [("--samples", "16"), ("--seq-len", "256"), ("--samples", "8"), ("--ignore", "x")]
)
def test_vllm_options_without_a_vllm_target_refused(
    model: Path, tmp_path: Path, given: tuple[str, str]
) -> None:
    """A vLLM-only option given with GGUF targets only is refused with the reason, also when
    its value equals the default (it was given, so the user expects it to apply)."""
    line = convert_fails(model, tmp_path / "o.gguf", *given)
    assert f"{given[0]} applies to vLLM targets" in line and "only gguf targets" in line, line
