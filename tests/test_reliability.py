"""Numerical hazards, disk space, hung engines, chat templates and concurrent runs."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

SMALL = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
O_PROJ = "model.layers.1.self_attn.o_proj.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("rel") / "m", "LlamaForCausalLM", **SMALL)


@pytest.fixture
def model(good: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(good, dst)
    return dst


def sha256(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def gguf_tensor(path: Path, name: str) -> np.ndarray:
    import gguf

    r = gguf.GGUFReader(path)
    return next(t for t in r.tensors if t.name == name).data


# -- numerical hazards -----------------------------------------------------------------------


def test_clamp_f16_clamps_and_lists_tensors(model: Path, tmp_path: Path) -> None:
    from safetensors.numpy import load_file, save_file

    t = load_file(model / "model.safetensors")
    t[O_PROJ][3, 5] = 1e6
    t[O_PROJ][0, 0] = -2e5
    save_file(t, model / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "c.gguf"
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out))
    assert r.returncode == 2 and "--clamp-f16" in r.stderr and not out.exists(), r.stderr
    r = run_cli("convert", str(model), "--to", "gguf:F16", "-o", str(out), "--clamp-f16")
    assert r.returncode == 0, r.stderr
    assert f"warning: --clamp-f16 clamped 1 tensor(s) to ±65504: {O_PROJ} (max |x| 1e+06)" in (
        r.stderr
    )
    w = gguf_tensor(out, "blk.1.attn_output.weight").astype(np.float32)
    assert w.max() == 65504.0 and w.min() == -65504.0
    # everything else is untouched: equal to a plain F16 cast of the source
    src = t[O_PROJ].copy()
    src[3, 5], src[0, 0] = 0, 0
    w[3, 5], w[0, 0] = 0, 0
    np.testing.assert_array_equal(w, src.astype(np.float16).astype(np.float32))


# -- disk space ------------------------------------------------------------------------------


def test_free_space_checked_before_writing(
    model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from quantkit import diskspace
    from quantkit.cli import main
    from quantkit.convert import convert

    planned: list[tuple[Path, int]] = []
    real_check = diskspace.check_free_space

    def record(items):
        items = list(items)
        planned.extend(items)
        real_check(items)

    monkeypatch.setattr("quantkit.convert.hf_to_gguf.check_free_space", record)
    out = tmp_path / "out"
    res = convert(model, ["F16", "Q8_0"], out)
    predicted = dict(planned)
    for a in res.artifacts:  # predictions are upper bounds of what gets written
        assert a.size <= predicted[a.path] <= 3 * a.size + 2**20, (a.type, a.size, predicted)

    # a disk with less free space than predicted + margin: refused before anything is written
    monkeypatch.setattr(
        diskspace.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**12, 10**12, 10**6)
    )
    monkeypatch.delenv("QUANTKIT_DEBUG", raising=False)
    out2 = tmp_path / "out2"
    with pytest.raises(SystemExit) as e:
        main(["convert", str(model), "--to", "gguf:F16", "-o", str(out2)])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2
    assert len(err.splitlines()) == 1 and "not enough free space: need" in err, err
    assert "1.0 MB free" in err and "-o" in err
    assert not out2.exists()
    # requantizing an existing float GGUF is checked the same way
    f16 = next(a.path for a in res.artifacts if a.type == "F16")
    with pytest.raises(diskspace.DiskSpaceError, match="not enough free space"):
        convert(f16, ["Q4_0"], out2)
    assert not out2.exists()


# -- engine processes ------------------------------------------------------------------------


def test_hung_engine_process_is_killed_on_timeout(tmp_path: Path) -> None:
    """A worker that never returns (here: blocked opening a FIFO nobody writes) is killed with
    its whole process group when the timeout passes, and its artifact fails with a reason."""
    import psutil

    from quantkit.validate.harness import run_worker

    fifo = tmp_path / "chunks.npy"
    os.mkfifo(fifo)
    job = {"engine": "llama.cpp", "role": "artifact", "chunks": str(fifo), "first": 0}
    t0 = time.monotonic()
    res, _ = run_worker(job, tmp_path / "w", timeout=3, progress=None, label="hang")
    elapsed = time.monotonic() - t0
    assert res == {"ok": False, "error": "timed out after 3 s"}
    assert 3 <= elapsed < 30
    left = [
        p
        for p in psutil.Process().children(recursive=True)
        if "quantkit.validate.worker" in " ".join(p.cmdline())
    ]
    assert not left, left


# -- chat templates --------------------------------------------------------------------------


def test_chat_template_stored_verbatim_never_rendered(model: Path, tmp_path: Path) -> None:
    """A template that would run a shell command if rendered outside a sandbox is copied into
    the GGUF byte for byte; converting and loading the file in llama.cpp run none of it."""
    from quantkit.convert import convert
    from quantkit.quantize.gguf.reader import read_gguf
    from quantkit.validate.llamacpp import LlamaCppModel

    marker = tmp_path / "rendered"
    template = (
        "{{ cycler.__init__.__globals__.os.system('touch " + str(marker) + "') }}"
        "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    )
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    out = convert(model, ["F32"], tmp_path / "t.gguf").artifacts[0].path
    info = read_gguf(out)
    assert info.metadata["tokenizer.chat_template"] == template
    m = LlamaCppModel(out, n_ctx=32, threads=1)
    try:
        assert m.logits([1, 2, 3]).shape[0] == 3
    finally:
        m.close()
    assert not marker.exists()


# -- concurrency -----------------------------------------------------------------------------


def _popen(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    e = {**os.environ, **(env or {})}
    e.pop("QUANTKIT_DEBUG", None)
    return subprocess.Popen(
        [sys.executable, "-m", "quantkit.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=e,
    )


def test_two_converts_into_one_output(model: Path, tmp_path: Path) -> None:
    """Two processes writing the same files of one output folder at the same time: both finish,
    every file is whole (the sha256 of a run alone), no temporary is left."""
    ref = tmp_path / "ref"
    r = run_cli("convert", str(model), "--to", "F16", "--to", "Q8_0", "-o", str(ref))
    assert r.returncode == 0, r.stderr
    out = tmp_path / "shared"
    procs = [
        _popen("convert", str(model), "--to", "F16", "--to", "Q8_0", "-o", str(out), "--force")
        for _ in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in ref.iterdir()) and len(names) == 2, names
    for n in names:
        assert sha256(out / n) == sha256(ref / n), n


LOCKED_BUILD = """
import sys, time
from pathlib import Path
from quantkit.atomic import atomic_dir, file_lock
target = Path(sys.argv[1])
with file_lock(target.with_name("." + target.name + ".lock")):
    if not target.exists():
        with atomic_dir(target) as tmp:
            with open(target.parent / "builds", "a") as f:
                f.write("x")
            for i in range(20):
                (tmp / f"part{i}").write_bytes(bytes([i]) * 100_000)
                time.sleep(0.01)
print(sum(p.stat().st_size for p in target.iterdir()))
"""


def test_two_processes_build_one_cache_entry_once(tmp_path: Path) -> None:
    """The pattern the demo-model and reference caches use (file lock + build in a temporary
    folder + one rename): two processes started together build the entry once, both see it whole."""
    target = tmp_path / "cache" / "entry"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", LOCKED_BUILD, str(target)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outs == ["2000000", "2000000"]
    assert (target.parent / "builds").read_text() == "x"
    assert sorted(p.name for p in target.parent.iterdir()) == [".entry.lock", "builds", "entry"]


CACHED_JSON = """
import sys, time
from pathlib import Path
from quantkit.atomic import cached_json
def make():
    with open(Path(sys.argv[1]).parent / "makes", "a") as f:
        f.write("x")
    time.sleep(0.5)
    return {"n": 1}
value, hit = cached_json(Path(sys.argv[1]), make)
print(value["n"], hit)
"""


def test_json_cache_made_once_and_a_damaged_entry_made_again(tmp_path: Path) -> None:
    """The sensitivity caches' pattern (quantkit/atomic.py cached_json): two processes asking
    at once make the entry once; a damaged entry is made again, not an error."""
    entry = tmp_path / "c" / "k.json"
    entry.parent.mkdir()
    cmd = [sys.executable, "-c", CACHED_JSON, str(entry)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outs = sorted(p.communicate(timeout=120)[0].strip() for p in procs)
    assert outs == ["1 False", "1 True"] and (entry.parent / "makes").read_text() == "x"
    entry.write_text('{"n": ')  # cut short
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.stdout.strip() == "1 False" and (entry.parent / "makes").read_text() == "xx"
    assert json.loads(entry.read_text()) == {"n": 1}


def test_two_validates_share_one_reference_cache(good: Path, tmp_path: Path) -> None:
    """Two `quantkit validate` runs on one cache at once: the reference is scored once, both
    reports agree, and the cache entry's log-probs match the sha256 recorded with them."""
    from quantkit.convert import convert

    gguf_path = convert(good, ["F32"], tmp_path / "m-F32.gguf").artifacts[0].path
    text = tmp_path / "text.txt"
    text.write_text(TRAIN_TEXT)
    cache = tmp_path / "cache"
    args = ["validate", str(gguf_path), "--reference", str(good), "--data", str(text)]
    args += ["--ctx", "64", "--chunks", "2", "--threads", "1", "--pp", "0", "--tg", "0"]
    procs = [
        _popen(*args, "--json", str(tmp_path / f"r{i}.json"), env={"QUANTKIT_CACHE": str(cache)})
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
    reps = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert sorted(r["reference"]["cache"]["hit"] for r in reps) == [False, True]
    assert reps[0]["reference"]["ppl"] == reps[1]["reference"]["ppl"]
    q = [r["artifacts"][0]["quality"] for r in reps]
    assert q[0]["ppl"] == q[1]["ppl"] and q[0]["kld_mean"] == q[1]["kld_mean"]
    root = cache / "validate" / "reference"
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert len(entries) == 1, sorted(p.name for p in root.iterdir())
    assert [p.name for p in root.iterdir() if p.name.startswith(".")] == [
        f".{entries[0].name}.lock"
    ], "a temporary was left in the cache"
    res = json.loads((entries[0] / "result.json").read_text())
    assert res["logprobs_sha256"] == sha256(entries[0] / "logprobs.npy")


def test_inspect_escapes_control_characters(tmp_path: Path, capsys) -> None:
    """Names and values read from a GGUF cannot send escape sequences to the terminal."""
    import struct

    from test_malformed import STRING, gguf_blob, gs

    from quantkit.cli import main

    evil = "\x1b]0;owned\x07\x1b[2J"
    f = tmp_path / "e.gguf"
    f.write_bytes(
        gguf_blob(
            kvs=[gs("general.name") + struct.pack("<I", STRING) + gs(evil)],
            tensors=[("tok\x1b[31m", [8], 0, 0)],
        )
    )
    main(["inspect", str(f)])
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "\\x1b]0;owned\\x07\\x1b[2J" in out and "tok\\x1b[31m" in out
