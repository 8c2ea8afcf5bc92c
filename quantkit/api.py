"""``quantkit.export``: the Python face of the converter, for fine-tuning pipelines.

A training run leaves an HF directory, a base plus a PEFT LoRA adapter, or a model still in
memory; ``export`` takes any of them. A model in memory is streamed tensor by tensor from its own
storage (no HF copy of the weights is saved first): its ``state_dict`` tensors are read in place
through the same path the converter uses for a checkpoint, and a PEFT model's adapter is merged
with exactly the arithmetic ``quantkit convert --adapter`` uses, so both write the same bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from quantkit.errors import InputError

# export(**options) -> convert() keyword arguments
CONVERT_OPTIONS = ("force", "threads", "name", "dry_run", "clamp_f16", "allow_pickle", "progress")


@dataclass
class ExportArtifact:
    path: Path
    format: str  # "gguf", "gguf-lora", "vllm-lora" or "hf" (a directory: no sha256)
    type: str  # F16, Q8_0, ... ("gguf-lora" for an adapter)
    size: int
    sha256: str
    audit: dict[str, Any] | None = None
    metrics: dict[str, Any] | None = None  # validation, when asked

    def to_json(self) -> dict[str, Any]:
        return {
            f.name: str(v) if isinstance(v, Path) else v
            for f in fields(self)
            for v in [getattr(self, f.name)]
        }


@dataclass
class ExportResult:
    artifacts: list[ExportArtifact]
    architecture: str
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "architecture": self.architecture,
            "artifacts": [a.to_json() for a in self.artifacts],
            "warnings": self.warnings,
        }


def export(
    model: Any,
    targets: str | Sequence[str],
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    adapter: Any = None,
    calib: str | os.PathLike[str] | None = None,
    validate: Any = None,
    **options: Any,
) -> ExportResult:
    """Export ``model`` to every target (the CLI's ``--to`` strings) under ``output_dir``.

    ``model``: a local HF checkpoint directory or Hub id (``org/name[@revision]``, through the
    HF cache), a ``transformers`` causal LM, or a ``peft``
    model (its active LoRA adapter is merged). ``tokenizer``: needed for a model in memory unless
    the model carries one as ``.tokenizer``. ``adapter``: a PEFT adapter directory to merge into
    a base given as a path. ``calib``: calibration text for an importance matrix (path models).
    ``options``: ``force``, ``threads``, ``name``, ``dry_run``, ``clamp_f16``, ``allow_pickle``,
    and the quantizer's ``output_type``, ``embedding_type``, ``pure``, ``leave_output``,
    ``imatrix`` (a file), ``no_fallback``.
    """
    from quantkit.convert import QuantSettings
    from quantkit.quantize.gguf import QuantizeOptions

    targets = [targets] if isinstance(targets, str) else list(targets)
    qfields = {"output_type", "embedding_type", "pure", "leave_output"}
    unknown = sorted(set(options) - set(CONVERT_OPTIONS) - qfields - {"imatrix", "no_fallback"})
    if unknown:
        raise InputError(f"export() got unknown option(s): {', '.join(unknown)}")
    quant = QuantSettings(
        options=QuantizeOptions(
            threads=options.get("threads"), **{k: options[k] for k in qfields if k in options}
        ),
        imatrix_file=Path(options["imatrix"]) if options.get("imatrix") else None,
        calib=Path(calib) if calib is not None else None,
        no_fallback=bool(options.get("no_fallback", False)),
    )
    kw = {k: options[k] for k in CONVERT_OPTIONS if k in options}
    out = Path(output_dir)
    if isinstance(model, (str, os.PathLike)):
        from quantkit.hub import resolve_model

        model = resolve_model(model)  # a Hub id: its snapshot in the HF cache
        res = _convert(model, targets, out, quant, adapter, kw)
    else:
        if adapter is not None:
            raise InputError(
                "adapter= goes with a base given as a path",
                "for a model in memory, pass the peft model itself",
            )
        if calib is not None:
            raise InputError(
                "calib= needs the model on disk (the matrix is collected by loading it)",
                "pass imatrix=FILE computed with `quantkit imatrix`, or save the model first",
            )
        with tempfile.TemporaryDirectory(prefix="quantkit-export-") as work:
            ckpt, lora = memory_checkpoint(model, tokenizer, Path(work))
            kw.setdefault("name", _default_name(model))
            res = _convert(ckpt, targets, out, quant, lora, kw)
            result = _result(res, kw)
            if validate and not kw.get("dry_run"):
                # the reference is the model itself (base + adapter for a peft model), scored
                # in this process; the folder holds its config.json and tokenizer
                _validate(result, Path(work), None, validate, options.get("threads"), model)
            return result
    result = _result(res, kw)
    if validate and not kw.get("dry_run"):
        _validate(result, Path(model), adapter, validate, options.get("threads"))
    return result


@dataclass
class _Converted:  # convert()'s result when only hf targets were asked
    artifacts: list[Any]
    architecture: str
    warnings: list[str] = field(default_factory=list)


def _convert(
    model: Any, targets: list[str], out: Path, quant: Any, adapter: Any, kw: dict[str, Any]
) -> Any:
    """GGUF and adapter targets through ``convert``, ``hf`` targets through the HF checkpoint
    writer (a folder ``STEM-hf[-DTYPE]`` each, after the others in the result)."""
    from quantkit.checkpoint import Checkpoint, read_json
    from quantkit.convert import convert
    from quantkit.convert.hf_checkpoint import is_hf_target, write_hf_checkpoint

    hf = [t for t in targets if is_hf_target(t)]
    rest = [t for t in targets if not is_hf_target(t)]
    if hf and kw.get("dry_run"):
        raise InputError("dry_run applies to GGUF targets", "leave the hf targets out of a dry run")
    if rest or not hf:
        res = convert(model, rest, out, quant=quant, adapter=adapter, **kw)
    else:
        cfg = model.config if isinstance(model, Checkpoint) else read_json(model / "config.json")
        archs = cfg.get("architectures") if isinstance(cfg, dict) else None
        res = _Converted([], str(archs[0]) if isinstance(archs, list) and archs else "?")
    for t in hf:
        res.artifacts.append(
            write_hf_checkpoint(model, t, out, adapter=adapter, force=bool(kw.get("force")),
                                name=kw.get("name"), out_is_folder=False)
        )  # fmt: skip
    return res


def _result(res: Any, kw: dict[str, Any]) -> ExportResult:
    return ExportResult(
        [_artifact(a, dry=bool(kw.get("dry_run"))) for a in res.artifacts],
        res.architecture,
        res.warnings,
    )


def _validate(
    result: ExportResult,
    model: Path,
    adapter: Any,
    spec: Any,
    threads: Any,
    in_memory: Any = None,
) -> None:
    """Score the artifacts against the model (base + adapter for a fine-tune) as
    ``quantkit validate`` does; each artifact gets its report entry as ``metrics``. A model in
    memory (``in_memory``) is its own reference, scored in this process (not cached); its
    vllm-lora artifacts are not scored (vLLM needs the base as a folder). ``spec``: a
    text path, or a dict with ``data`` and any of ``ctx``, ``chunks``, ``lora_base`` (a base
    GGUF for gguf-lora artifacts). vllm-lora artifacts of a fine-tune are scored in vLLM on the
    model (the base), the adapter applied through vLLM's LoRA requests."""
    from quantkit.validate.harness import Settings, split_lora_bases
    from quantkit.validate.harness import validate as run_validate

    spec = spec if isinstance(spec, dict) else {"data": spec}
    unknown = sorted(set(spec) - {"data", "ctx", "chunks", "lora_base"})
    if unknown or "data" not in spec:
        raise InputError(
            f"validate= takes data, ctx, chunks, lora_base (got {', '.join(unknown) or 'no data'})"
        )
    gguf_base, vllm_base = split_lora_bases(
        [Path(spec["lora_base"])] if spec.get("lora_base") else []
    )
    arts = [
        a for a in result.artifacts
        if a.format == "gguf"
        or (a.format == "gguf-lora" and gguf_base is not None)
        or (a.format == "vllm-lora" and adapter is not None and in_memory is None)
    ]  # fmt: skip
    settings = Settings(
        ctx=int(spec.get("ctx", 512)),
        chunks=spec.get("chunks"),
        threads=threads,
        pp=0,
        tg=0,
        adapter=Path(adapter) if adapter is not None else None,
        lora_base=gguf_base,
        vllm_lora_base=vllm_base,
    )
    report = run_validate(
        [a.path for a in arts], model, Path(spec["data"]), settings, reference_model=in_memory
    )
    for a, entry in zip(arts, report["artifacts"], strict=True):
        a.metrics = entry


def _artifact(a: Any, dry: bool) -> ExportArtifact:
    from quantkit.convert.hf_checkpoint import HFArtifact
    from quantkit.convert.hf_to_gguf import ADAPTER_TARGETS
    from quantkit.hashing import sha256_file

    fmt = a.type if a.type in ADAPTER_TARGETS else "gguf"
    return ExportArtifact(
        path=a.path,
        format="hf" if isinstance(a, HFArtifact) else fmt,
        type=a.type,
        size=a.size,
        sha256="" if dry or a.path.is_dir() else sha256_file(a.path),
        audit=a.to_json().get("audit"),
    )


def _default_name(model: Any) -> str:
    base = model.get_base_model() if _is_peft(model) else model
    name = str(getattr(base.config, "_name_or_path", "") or "").rstrip("/").split("/")[-1]
    return name or "model"


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def memory_checkpoint(model: Any, tokenizer: Any, work: Path) -> tuple[Any, Any]:
    """A ``Checkpoint`` over a model's tensors in memory (read in place), plus the adapter of a
    PEFT model. Only config.json and the tokenizer files are written (to ``work``)."""
    from quantkit.checkpoint import Checkpoint
    from quantkit.convert.lora import LoraAdapter, memory_info

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None or not hasattr(tokenizer, "save_pretrained"):
        raise InputError(
            "a model in memory needs its tokenizer",
            "pass tokenizer=AutoTokenizer.from_pretrained(...) (the one the model was trained with)",
        )
    lora = None
    base = model
    if _is_peft(model):
        name = getattr(model, "active_adapter", "default")
        lora = LoraAdapter.from_peft(model, name if isinstance(name, str) else name[0])
        base = model.get_base_model()
    if not hasattr(base, "state_dict") or not hasattr(base, "config"):
        raise InputError(
            f"cannot export a {type(model).__name__}",
            "pass a checkpoint folder, a transformers causal LM, or a peft model",
        )
    config = base.config.to_dict()
    if not config.get("architectures"):
        config["architectures"] = [type(base).__name__]
    (work / "config.json").write_text(json.dumps(config))
    tokenizer.save_pretrained(work)
    state: dict[str, Any] = {}
    for key, t in base.state_dict().items():
        # PEFT wraps adapted layers: "<m>.base_layer.weight" is the base weight, and
        # "<m>.original_module.weight" the base copy of a module trained in full; the LoRA and
        # trained copies come with the adapter
        if ".lora_" in key or ".modules_to_save." in key:
            continue
        key = key.replace(".base_layer.", ".").replace(".original_module.", ".")
        state[key] = t.detach().cpu()
    infos = {k: memory_info(k, t) for k, t in state.items()}
    return Checkpoint(work, config, infos, _pickled=state), lora
