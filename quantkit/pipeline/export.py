"""``quantkit.export``: the Python face of the export, for fine-tuning pipelines.

A training run leaves an HF directory, a base plus a PEFT LoRA adapter, or a model still in
memory; ``export`` takes any of them, to every target ``quantkit convert`` makes, through the
same dispatch (quantkit/pipeline/build.py). A model in memory is streamed tensor by tensor from
its own storage: its ``state_dict`` tensors are read in place through the same path the
converter uses for a checkpoint, and a PEFT model's adapter is merged with exactly the
arithmetic ``quantkit convert --adapter`` uses, so both write the same bytes. Tools that load a
model in torch (llm-compressor, the importance matrix) get a temporary merged copy instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from quantkit.errors import InputError

if TYPE_CHECKING:
    from collections.abc import Iterable

    from quantkit.pipeline.build import BuildResult
    from quantkit.targets import Target

# GGUF tensor options, set on every GGUF target (a recipe gives them per target)
GGUF_OPTIONS = ("output_type", "embedding_type", "pure", "leave_output", "overrides")


def export(
    model: Any,
    targets: str | Target | Iterable[str | Target],
    output_dir: str | os.PathLike[str],
    *,
    tokenizer: Any = None,
    adapter: Any = None,
    calib: str | os.PathLike[str] | None = None,
    validate: Any = None,
    **options: Any,
) -> BuildResult:
    """Export ``model`` to every target under ``output_dir``.

    ``targets``: the CLI's ``--to`` strings (``gguf:Q8_0``, ``gguf:auto:size=90MB``, ``gptq``,
    ``awq:group=64``, ``fp8``, ``hf:bf16``, ``gguf-lora``, ``vllm-lora``) or Target models
    (quantkit/targets.py), one or several. ``model``: a local HF checkpoint directory or Hub id
    (``org/name[@revision]``, through the HF cache), a ``transformers`` causal LM, or a ``peft``
    model (its active LoRA adapter is merged). ``tokenizer``: needed for a model in memory
    unless the model carries one as ``.tokenizer``. ``adapter``: a PEFT adapter directory to
    merge into a base given as a path. ``calib``: calibration text (importance matrix, GPTQ/AWQ
    samples), for models on disk and in memory alike: a fine-tune's matrix and llm-compressor
    see the merged model, from a temporary merged copy removed afterwards.
    ``options``: ``force``, ``threads``, ``name``, ``dry_run``, ``clamp_f16``, ``allow_pickle``,
    ``no_fallback``, ``imatrix`` (a saved matrix), ``calib_ctx``, ``calib_chunks``,
    ``samples``, ``seq_len``, ``ignore``, ``layouts``, ``converter``, ``progress``, and the GGUF
    tensor options ``output_type``, ``embedding_type``, ``pure``, ``leave_output``,
    ``overrides``. The same inputs give the same bytes as ``quantkit convert``.
    """
    from quantkit.pipeline.build import ExportOptions, build, with_options
    from quantkit.targets import parse_targets

    known = {f.name for f in fields(ExportOptions)} - {"calib"}  # calib= is its own argument
    unknown = sorted(set(options) - known - set(GGUF_OPTIONS))
    if unknown:
        raise InputError(f"export() got unknown option(s): {', '.join(unknown)}")
    ts = with_options(
        parse_targets(targets), **{k: options.pop(k) for k in GGUF_OPTIONS if k in options}
    )
    o = ExportOptions(**options)
    o.calib = Path(calib) if calib is not None else None
    o.imatrix = Path(o.imatrix) if o.imatrix else None
    o.ignore, o.layouts = tuple(o.ignore), tuple(o.layouts)
    out = Path(output_dir)
    with _source(model, tokenizer, adapter, o) as src:
        result = build(src, ts, out, o, out_is_dir=True)
        if validate and not o.dry_run:
            # the reference: the checkpoint (+ adapter), or the model in memory itself, scored
            # in this process (its folder holds config.json and the tokenizer)
            memory = model if src.in_memory else None
            _validate(result, src.folder, None if memory else adapter, validate, o.threads, memory)
    return result


@contextmanager
def _source(model: Any, tokenizer: Any, adapter: Any, o: Any) -> Iterator[Any]:
    """The build's Source: a folder or Hub id (+ adapter), or a model in memory read in place."""
    from quantkit.pipeline.build import Source

    if isinstance(model, (str, os.PathLike)):
        from quantkit.hub import resolve_model

        # a Hub id: its snapshot in the HF cache
        with Source(resolve_model(model), adapter, o.name) as src:
            yield src
        return
    if adapter is not None:
        raise InputError(
            "adapter= goes with a base given as a path",
            "for a model in memory, pass the peft model itself",
        )
    with tempfile.TemporaryDirectory(prefix="quantkit-export-") as work:
        ckpt, lora = memory_checkpoint(model, tokenizer, Path(work))
        with Source(ckpt, lora, o.name) as src:
            yield src


def _validate(
    result: BuildResult,
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
        if a.format in ("gguf", "vllm", "hf")
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


def _is_peft(model: Any) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def memory_checkpoint(model: Any, tokenizer: Any, work: Path) -> tuple[Any, Any]:
    """A ``Checkpoint`` over a model's tensors in memory (read in place), plus the adapter of a
    PEFT model. Only config.json, generation_config.json and the tokenizer files are written (to
    ``work``)."""
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
    # the stop ids (eos_token_id, often a list) and sampling defaults a chat model serves with;
    # transformers keeps them on the model, not in config.json
    gen = getattr(base, "generation_config", None)
    if gen is not None and hasattr(gen, "to_json_string"):
        (work / "generation_config.json").write_text(gen.to_json_string(use_diff=True))
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
