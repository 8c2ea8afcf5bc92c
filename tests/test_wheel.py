"""quantkit as a user installs it: ``python -m build`` makes an sdist and a wheel (the wheel built
from the sdist, so both carry every module and data file), the wheel goes into a fresh venv
(not editable), and the ``quantkit`` command there runs --help, types, recipes and a convert.

The fresh venv borrows the test venv's third-party packages through a path file, so the test
needs no network and no second multi-GB torch install; quantkit itself can only come from the
wheel (the editable install's import hook lives in the borrowed folder's .pth files, which a
path entry does not run), and the test checks that it does.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from conftest import REPO, TINY, save_bpe_tokenizer

pytest.importorskip("build", reason="the PyPA `build` package (a dev dependency) is not installed")


def _run(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PYTHONNOUSERSITE"] = "1"
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env, timeout=600, **kw)


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory) -> tuple[Path, Path]:
    """(the built wheel, a fresh venv with it installed)."""
    tmp = tmp_path_factory.mktemp("wheel")
    r = _run([sys.executable, "-m", "build", "--outdir", str(tmp / "dist"), str(REPO)], cwd=tmp)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    wheels = list((tmp / "dist").glob("quantkit_llm-*.whl"))
    sdists = list((tmp / "dist").glob("quantkit_llm-*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list((tmp / "dist").iterdir())

    venv = tmp / "venv"
    r = _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], cwd=tmp)
    assert r.returncode == 0, r.stderr
    vpy = venv / "bin" / "python"
    purelib = Path(_run([str(vpy), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                        cwd=tmp).stdout.strip())  # fmt: skip
    (purelib / "_borrowed_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    r = _run([sys.executable, "-m", "pip", "--python", str(vpy), "install", "-q", "--no-deps",
              "--ignore-installed", str(wheels[0])], cwd=tmp)  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return wheels[0], venv


def test_wheel_holds_every_package_and_data_file(wheel_venv) -> None:
    wheel, _ = wheel_venv
    names = set(zipfile.ZipFile(wheel).namelist())
    # every package of the source tree, found by walking it, must be in the wheel
    roots = {"quantkit": "quantkit", "quantkit/convert": "convert", "quantkit/quantize": "quantize",
             "quantkit/validate": "validate", "quantkit/recipes": "recipes"}  # fmt: skip
    missing = []
    for pkg, folder in roots.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.relative_to(REPO / folder).as_posix()
            if f"{pkg}/{rel}" not in names:
                missing.append(f"{pkg}/{rel}")
    assert not missing, f"packages missing from the wheel: {missing}"
    assert "quantkit/validate/report.schema.json" in names
    assert {f"quantkit/recipes/{p.name}" for p in (REPO / "recipes").glob("*.yaml")} <= names


def test_installed_command_runs(wheel_venv, tmp_path) -> None:
    _, venv = wheel_venv
    exe = str(venv / "bin" / "quantkit")
    where = _run([str(venv / "bin" / "python"), "-c", "import quantkit; print(quantkit.__file__)"],
                 cwd=tmp_path)  # fmt: skip
    assert where.returncode == 0 and where.stdout.strip().startswith(str(venv)), where

    r = _run([exe, "--help"], cwd=tmp_path)
    assert r.returncode == 0 and "convert" in r.stdout and "validate" in r.stdout, r.stderr
    r = _run([exe, "types"], cwd=tmp_path)
    assert r.returncode == 0 and "Q4_K_M" in r.stdout and "IQ4_XS" in r.stdout, r.stderr
    r = _run([exe, "recipes", "list"], cwd=tmp_path)
    assert r.returncode == 0 and "demo" in r.stdout and "laptop" in r.stdout, r.stdout + r.stderr


def test_installed_command_converts(wheel_venv, tmp_path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    _, venv = wheel_venv
    model = tmp_path / "tiny"
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**TINY)).save_pretrained(model)
    save_bpe_tokenizer(model)
    r = _run([str(venv / "bin" / "quantkit"), "convert", str(model), "--to", "gguf:F16",
              "--to", "gguf:Q8_0", "-o", str(tmp_path / "out")], cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    written = sorted(p.name for p in (tmp_path / "out").glob("*.gguf"))
    assert written == ["tiny-F16.gguf", "tiny-Q8_0.gguf"], written
