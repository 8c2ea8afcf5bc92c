"""The fallback converter: llama.cpp's own ``convert_hf_to_gguf.py`` of exactly the engine's version.

Architectures without a native class (convert/archs) still convert: the llama-cpp-python source
distribution the engine was built from carries llama.cpp's converter (``convert_hf_to_gguf.py``,
its ``conversion`` package and ``gguf-py``), so the file always matches the engine that loads it
(docs/decisions.md, decision 5). That source is extracted once into
``$QUANTKIT_CACHE/upstream/<version>/`` (to a temporary name, renamed when complete) and run in a
subprocess with this interpreter and PYTHONPATH pointing at its gguf-py.

quantkit still owns everything around it: preflight (known architecture, no custom code, the
checkpoint's safetensors headers, writable outputs), atomic output, quantization of the float
base by llama.cpp's quantizer, the audit, and the tokenizer: where llama.cpp's converter does not
recognise a byte-level BPE pre-tokenizer that quantkit recognises structurally, quantkit supplies
the name (upstream_driver.py), and the written vocabulary is checked against quantkit's reading.
"""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

from quantkit.errors import EngineError, InputError, UnsupportedArchitectureError
from quantkit.paths import sdist_dir, upstream_dir

# What the converter needs from the sdist (paths under vendor/llama.cpp/).
MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/gguf/")
CONVERTER_OUTTYPE = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # its --outtype choices
DRIVER = Path(__file__).with_name("upstream_driver.py")


def engine_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama_cpp_python")
    except PackageNotFoundError:
        raise EngineError("llama-cpp-python is not installed", "run scripts/install.sh") from None


def sdist_path(version: str) -> Path:
    return sdist_dir() / f"llama_cpp_python-{version}.tar.gz"


def source_dir(version: str | None = None) -> Path:
    """llama.cpp's converter of the engine's version, extracted once from the sdist."""
    version = version or engine_version()
    dest = upstream_dir() / version
    if (dest / "convert_hf_to_gguf.py").is_file():
        return dest
    sdist = sdist_path(version)
    if not sdist.is_file():
        raise EngineError(
            f"the llama-cpp-python {version} source ({sdist}) is not in the cache",
            f"run scripts/install.sh, or: pip download --no-deps --no-binary :all: "
            f"llama-cpp-python=={version} -d {sdist.parent}",
        )
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.tmp-", dir=dest.parent))
    try:
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        with tarfile.open(sdist) as tf:
            for m in tf.getmembers():
                if not m.name.startswith(prefix) or not (m.isfile() or m.isdir()):
                    continue
                rel = m.name[len(prefix) :]
                if not rel.startswith(MEMBERS):
                    continue
                m = m.replace(name=rel)
                tf.extract(m, tmp, filter="data")
        if not (tmp / "convert_hf_to_gguf.py").is_file():
            raise EngineError(f"{sdist}: no vendor/llama.cpp/convert_hf_to_gguf.py inside")
        try:
            tmp.rename(dest)
        except OSError:  # another process finished first: use its copy
            if not (dest / "convert_hf_to_gguf.py").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


@lru_cache(maxsize=4)
def known_architectures(version: str | None = None) -> tuple[str, ...]:
    """The HF architectures llama.cpp's converter converts as text models, read from its
    dispatch table (``TEXT_MODEL_MAP`` in conversion/__init__.py) and its
    ``@ModelBase.register(...)`` decorators, parsed, not imported."""
    src = source_dir(version) / "conversion"
    table: set[str] = set()
    tree = ast.parse((src / "__init__.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign | ast.Assign):
            targets = [node.target] if isinstance(node, ast.AnnAssign) else node.targets
            if any(isinstance(t, ast.Name) and t.id == "TEXT_MODEL_MAP" for t in targets):
                table = set(ast.literal_eval(node.value))  # type: ignore[arg-type]
    registered: set[str] = set()
    for path in sorted(src.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ClassDef):
                continue
            for dec in node.decorator_list:
                if (
                    isinstance(dec, ast.Call)
                    and isinstance(dec.func, ast.Attribute)
                    and dec.func.attr == "register"
                ):
                    registered.update(
                        a.value
                        for a in dec.args
                        if isinstance(a, ast.Constant) and isinstance(a.value, str)
                    )
    return tuple(sorted(table & registered))


def _architectures(model_dir: Path) -> list[str]:
    from quantkit.checkpoint import read_json

    config = read_json(model_dir / "config.json")
    archs = config.get("architectures") if isinstance(config, dict) else None
    return [a for a in archs if isinstance(a, str)] if isinstance(archs, list) else []


def preflight(model_dir: Path) -> str:
    """The architecture llama.cpp's converter will use; refuses what it cannot do safely."""
    from quantkit.checkpoint import read_json

    archs = _architectures(model_dir)
    if not archs:
        raise UnsupportedArchitectureError(f"{model_dir}/config.json: no 'architectures' entry")
    known = known_architectures()
    arch = archs[0]  # llama.cpp's converter uses the first (get_model_architecture)
    if arch not in known:
        raise UnsupportedArchitectureError(
            f"config.json: architecture {arch!r} is known neither to quantkit nor to llama.cpp's "
            f"converter ({engine_version()})",
            "`quantkit archs` lists what converts",
        )
    # llama.cpp's converter loads some tokenizers with trust_remote_code=True; quantkit never
    # runs code shipped with a model, so a model that carries any is refused here.
    custom = sorted(p.name for p in model_dir.glob("*.py"))
    for name in ("config.json", "tokenizer_config.json"):
        p = model_dir / name
        if p.is_file() and isinstance(d := read_json(p), dict) and d.get("auto_map"):
            custom.append(f"{name}:auto_map")
    if custom:
        raise UnsupportedArchitectureError(
            f"{model_dir}: the model ships custom code ({', '.join(custom[:3])})",
            "quantkit never runs code shipped with a model",
        )
    return arch


def bpe_pre(model_dir: Path) -> str | None:
    """quantkit's structural reading of the tokenizer's BPE pre-tokenizer (None: not BPE, or
    quantkit cannot read it either; the converter then decides alone)."""
    from quantkit.convert.tokenizer import load_vocab
    from quantkit.errors import QuantkitError

    try:
        vocab = load_vocab(model_dir)
    except QuantkitError:
        return None
    return vocab.pre if vocab.model == "gpt2" else None


def run_converter(
    model_dir: Path, out: Path, outtype: str, *, pre: str | None, name: str | None = None
) -> None:
    """llama.cpp's converter in a subprocess, writing ``out`` (a path quantkit renames later).

    Its output is shown only with QUANTKIT_DEBUG=1; a failure becomes one EngineError line
    ending with the converter's last words."""
    src = source_dir()
    debug = bool(os.environ.get("QUANTKIT_DEBUG"))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(src / "gguf-py"), str(src)]),
        "HF_HUB_OFFLINE": "1",  # nothing is fetched: a local model only
        "TRANSFORMERS_OFFLINE": "1",
        "NO_LOCAL_GGUF": "1",  # gguf-py comes from PYTHONPATH (the same copy)
        "QUANTKIT_BPE_PRE": pre or "",
    }
    cmd = [sys.executable, str(DRIVER), str(src), str(model_dir),
           "--outfile", str(out), "--outtype", CONVERTER_OUTTYPE[outtype]]  # fmt: skip
    if name:
        cmd += ["--model-name", name]  # its general.name (default: from the folder and model card)
    proc = subprocess.run(
        cmd,
        env=env,
        stdout=None if debug else subprocess.PIPE,
        stderr=None if debug else subprocess.STDOUT,
        text=True,
        errors="replace",
        check=False,
    )
    if proc.returncode != 0 or not out.is_file():
        raise EngineError(
            f"llama.cpp's converter failed on {model_dir}: {last_words(proc.stdout or '')}",
            "QUANTKIT_DEBUG=1 shows its full output",
        )


def last_words(output: str) -> str:
    """The line of converter output that says why it stopped (exception, else last error)."""
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        head = ln.split(":", 1)[0]
        if head.endswith(("Error", "Exception")) and " " not in head:
            return ln
    for ln in reversed(lines):
        if ln.startswith("ERROR:"):
            return ln
    return lines[-1] if lines else "no output"


def check_vocab(path: Path, model_dir: Path) -> list[str]:
    """Differences between the vocabulary the converter wrote and quantkit's reading of the
    tokenizer (empty when quantkit cannot read it: nothing to compare with)."""
    from quantkit.convert.tokenizer import load_vocab
    from quantkit.errors import QuantkitError
    from quantkit.quantize.gguf.reader import read_gguf

    try:
        ours = load_vocab(model_dir)
    except QuantkitError:
        return []
    info = read_gguf(path, keep_arrays=("tokenizer.ggml.tokens",))
    md = info.metadata
    notes = []
    if md.get("tokenizer.ggml.model") != ours.model:
        notes.append(
            f"tokenizer model {md.get('tokenizer.ggml.model')!r}, quantkit reads {ours.model!r}"
        )
    elif ours.model == "gpt2" and md.get("tokenizer.ggml.pre") != ours.pre:
        notes.append(
            f"tokenizer.ggml.pre {md.get('tokenizer.ggml.pre')!r}, quantkit reads {ours.pre!r}"
        )
    tokens = md.get("tokenizer.ggml.tokens")
    if isinstance(tokens, list):
        n = min(len(tokens), len(ours.tokens))
        diff = [i for i in range(n) if tokens[i] != ours.tokens[i]]
        if diff:
            notes.append(
                f"{len(diff)} token text(s) differ from quantkit's reading (e.g. id {diff[0]})"
            )
    notes += _lost_stops(md, tokens if isinstance(tokens, list) else None, ours)
    return notes


def _lost_stops(md: dict[str, Any], tokens: list[str] | None, ours: Any) -> list[str]:
    """Stop ids quantkit makes end-of-generation (eos/eot/eom from the tokenizer and
    generation_config.json, convert/tokenizer.py) that the converter's file leaves out: neither
    its eos/eot/eom ids nor a text llama.cpp stops on (its converter does not read
    generation_config.json's stop list)."""
    from quantkit.convert.tokenizer import LLAMA_EOG_TEXTS

    have = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    out = []
    for kind in ("eos", "eot", "eom"):
        tid = ours.special_ids.get(kind)
        if tid is None or tid in have:
            continue
        text = tokens[tid] if tokens is not None and tid < len(tokens) else ours.tokens[tid]
        if text not in LLAMA_EOG_TEXTS:
            out.append(
                f"stop token {tid} {text!r} is not end-of-generation in the file: llama.cpp "
                "will not stop on it (convert with the native converter, or pass it as a stop "
                "string)"
            )
    return out


def convert_upstream(
    model_dir: Path,
    types: Sequence[Any],
    paths: dict[str, Path],
    *,
    force: bool,
    allow_pickle: bool,
    threads: int | None,
    progress: Any,
    quant: Any,
    dry_run: bool,
    name: str | None = None,
) -> Any:
    """``convert`` through llama.cpp's converter: float bases from it, the rest as usual.
    ``paths``: each type's output (quantkit/pipeline/build.py ``place``); ``name``: the
    general.name given (else llama.cpp's converter names the model)."""
    from quantkit.convert.hf_to_gguf import ConvertResult
    from quantkit.quantize.gguf.reader import read_gguf

    t_start = time.perf_counter()
    if dry_run:
        raise InputError(
            "--dry-run plans from quantkit's native converter; this architecture goes through "
            "llama.cpp's converter",
            "convert to a float type first, then dry-run the quantized types from that GGUF",
        )
    job = _preflight(model_dir, types, paths, name, force=force, allow_pickle=allow_pickle,
                     threads=threads, quant=quant)  # fmt: skip
    timings = {"preflight": time.perf_counter() - t_start}
    artifacts, notes = _write(job, quant, timings, force=force, progress=progress)
    info = read_gguf(artifacts[0].path)
    return ConvertResult(
        artifacts,
        str(info.metadata.get("general.architecture", job.arch_name)),
        timings=timings,
        imatrix=job.imatrix,
        converter="upstream",
        notes=notes,
    )


@dataclass
class _Job:
    """A conversion that passed its preflight: what to make, and where."""

    model_dir: Path
    name: str | None  # general.name, when given
    arch_name: str
    paths: dict[str, Path]  # by type name
    floats: list[Any]  # the float types asked for: the converter writes each
    quants: list[Any]  # the quantized types: llama.cpp's quantizer makes them from the base
    base_name: str | None  # the float type the quantized ones are made from
    imatrix: Any
    options: Any  # the quantizer's options
    pre: str | None  # the BPE pre-tokenizer name quantkit supplies


def _preflight(
    model_dir: Path,
    types: Sequence[Any],
    paths: dict[str, Path],
    name: str | None,
    *,
    force: bool,
    allow_pickle: bool,
    threads: int | None,
    quant: Any,
) -> _Job:
    """Everything that can fail cheaply, before the converter runs."""
    from quantkit.atomic import check_writable
    from quantkit.checkpoint import Checkpoint
    from quantkit.convert.quantized import preflight_imatrix, with_imatrix
    from quantkit.quantize.gguf.types import base_type

    arch_name = preflight(model_dir)
    if quant.calib is not None:
        raise InputError(
            "--calib collects the importance matrix with quantkit's native architecture classes",
            "compute one with llama.cpp's llama-imatrix on the float GGUF, then pass --imatrix FILE",
        )
    with Checkpoint.open(model_dir, allow_pickle=allow_pickle) as ckpt:  # headers, pickle policy
        src_base = base_type(ckpt.source_dtype)
        n_params = sum(t.n_elements for t in ckpt.tensors.values())
    for p in paths.values():
        check_writable(p, force=force)
    floats = [t for t in types if t.base]
    quants = [t for t in types if not t.base]
    _check_space(types, paths, quants, floats, src_base, n_params)
    imatrix = preflight_imatrix(quants, quant, False)  # a dry run was refused before
    options = with_imatrix(quant.options, imatrix, quant.imatrix_file)
    if threads and not options.threads:
        options = replace(options, threads=threads)
    pre = bpe_pre(model_dir)
    base_name = base_type(src_base, [t.name for t in floats]) if quants else None
    return _Job(model_dir, name, arch_name, paths, floats, quants, base_name, imatrix, options,
                pre)  # fmt: skip


def _check_space(
    types: Sequence[Any],
    paths: dict[str, Path],
    quants: list[Any],
    floats: list[Any],
    src_base: str,
    n_params: int,
) -> None:
    """Free space from the parameter count and each type's nominal bits per weight (llama.cpp's
    converter plans its own tensors, so there is no per-tensor plan to sum here)."""
    from quantkit.diskspace import check_free_space
    from quantkit.quantize.gguf.types import GGUF_TYPES

    planned = [(paths[t.name], int(n_params * t.bpw / 8)) for t in types]
    if quants and src_base not in {t.name for t in floats}:
        planned.append((paths[quants[0].name], int(n_params * GGUF_TYPES[src_base].bpw / 8)))
    check_free_space(planned)


def _write(
    job: _Job, quant: Any, timings: dict[str, float], *, force: bool, progress: Any
) -> tuple[list[Any], list[str]]:
    """The float files from the converter, checked, then the quantized ones from the base;
    every output renamed into place only when complete. Returns the artifacts and the notes."""
    from quantkit.atomic import output_dirs
    from quantkit.convert.loadcheck import check_gguf_vocab, check_loads
    from quantkit.convert.quantized import quantize_one
    from quantkit.quantize.gguf.reader import read_gguf

    with ExitStack() as stack:
        stack.enter_context(output_dirs(list(job.paths.values())))
        t0 = time.perf_counter()
        made, shown = _run_converters(job, stack, force=force, progress=progress)
        for t_name, path in made.items():
            # the name and vocabulary are the converter's: what would stop llama.cpp (or abort
            # it, duplicate token texts) is named from the metadata before the load itself
            check_gguf_vocab(path, shown[t_name])
            check_loads(path, shown[t_name])
        timings["stream"] = time.perf_counter() - t0
        first = next(iter(made.values()))
        notes = check_vocab(first, job.model_dir)
        n_tensors = len(read_gguf(first).tensors)
        artifacts = _float_artifacts(job, made, n_tensors, timings["stream"])
        t1 = time.perf_counter()
        for q in job.quants:
            artifacts.append(
                quantize_one(made[job.base_name], q, job.paths[q.name], job.options, quant,  # type: ignore[index]
                             n_tensors, force=force, dry_run=False, progress=progress)
            )  # fmt: skip
        if job.quants:
            timings["quantize"] = time.perf_counter() - t1
    return artifacts, notes


def _run_converters(
    job: _Job, stack: ExitStack, *, force: bool, progress: Any
) -> tuple[dict[str, Path], dict[str, str]]:
    """Each float type asked for, and the base the quantized ones need when it is not one of
    them (a scratch file beside their first output). Returns where each was written and how
    each is named in messages, both by type name."""
    from quantkit.atomic import atomic_output, scratch_file

    made: dict[str, Path] = {}
    shown: dict[str, str] = {}
    for t in job.floats:
        tmp = stack.enter_context(atomic_output(job.paths[t.name], force=force))
        if progress:
            progress("convert (llama.cpp)", 0, 1)
        run_converter(job.model_dir, tmp, t.name, pre=job.pre, name=job.name)
        if progress:
            progress("convert (llama.cpp)", 1, 1)
        made[t.name] = tmp
        shown[t.name] = job.paths[t.name].name
    if job.base_name is not None and job.base_name not in made:
        first_quant = job.paths[job.quants[0].name]
        base = stack.enter_context(scratch_file(first_quant))
        run_converter(job.model_dir, base, job.base_name, pre=job.pre, name=job.name)
        made[job.base_name] = base
        shown[job.base_name] = f"the {job.base_name} base of {first_quant.name}"
    return made, shown


def _float_artifacts(job: _Job, made: dict[str, Path], n_tensors: int, seconds: float) -> list[Any]:
    """The float files' artifacts, each audited (the audit names the final path)."""
    from quantkit.convert.quantized import Artifact
    from quantkit.quantize.gguf.audit import audit

    artifacts = []
    for t in job.floats:
        tmp = made[t.name]
        aud = audit(tmp)
        aud.path = str(job.paths[t.name])
        artifacts.append(
            Artifact(job.paths[t.name], t.name, tmp.stat().st_size, n_tensors, seconds, audit=aud)
        )
    return artifacts


__all__ = [
    "convert_upstream",
    "engine_version",
    "known_architectures",
    "source_dir",
]
