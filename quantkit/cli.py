"""The ``quantkit`` command: a thin click layer over the keyword API.

Errors: library code raises ``QuantkitError``; ``main`` prints one line (``quantkit: error: …``)
and exits with the code from ``errors.EXIT_CODES``. ``QUANTKIT_DEBUG=1`` shows the traceback.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import click

from quantkit import __version__
from quantkit.atomic import atomic_output, cleanup_all
from quantkit.errors import Interrupted, QuantkitError, exit_code_for
from quantkit.progress import ProgressPrinter
from quantkit.table import format_table, human_bytes
from quantkit.text import read_text

EPILOG_CONVERT = """\b
Examples:
  quantkit convert ./my-model --to gguf:F16 -o my-model-F16.gguf
  quantkit convert ./my-model --to gguf:F16 --to gguf:Q8_0 --to gguf:Q4_K_M -o out/
  quantkit convert ./my-model --to gguf:IQ4_XS --calib calib.txt -o out/
  quantkit convert ./my-model --to gguf:Q4_K_M --tensor-type 'attn_v=q6_k' --dry-run
  quantkit convert ./my-model --to gguf:auto:size=100MB --calib calib.txt --dry-run
  quantkit convert ./my-model --to gguf:auto:bpw=4.5:types=Q4_K,Q5_K,Q6_K,Q8_0 --calib c.txt
  quantkit convert ./my-model --to Q8_0 --force -o out/ --json

vLLM targets (llm-compressor; `quantkit engines setup llmcompressor` once):
  quantkit convert ./my-model --to fp8 -o my-model-fp8/
  quantkit convert ./my-model --to gptq:bits=4,group=64 --calib calib.txt -o my-model-gptq/
  quantkit convert ./my-model --to awq:group=64 --calib calib.txt --samples 64 --seq-len 512
  quantkit convert ./my-model --to gptq:group=64,actorder=group --layout legacy --calib c.txt
  quantkit convert ./my-model --to gptq --ignore lm_head --ignore 're:.*down_proj$' --calib c.txt

A plain HF checkpoint (safetensors; transformers and vLLM load it), e.g. a merged fine-tune:
  quantkit convert ./base --adapter ./my-lora --to hf:bf16 -o my-finetune/
"""

EPILOG_INSPECT = """\b
Examples:
  quantkit inspect out/my-model-Q8_0.gguf
  quantkit inspect out/my-model-Q8_0.gguf --json > info.json
"""


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, "--version", prog_name="quantkit")
def cli() -> None:
    """Export Hugging Face checkpoints as GGUF for llama.cpp or as FP8/GPTQ/AWQ checkpoints for
    vLLM, and check every artifact in its own engine against the original model.

    Run `quantkit COMMAND --help` for a command's options and examples.
    """


@cli.command(epilog=EPILOG_CONVERT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="gguf:TYPE|gguf:auto:size=N|bpw=X|gptq|awq|fp8|hf[:OPTIONS]",
    help="Output type, repeatable (case-insensitive; `quantkit types` lists them): gguf:F16, "
    "gguf:Q8_0, gguf:Q4_K_M, gguf:IQ4_XS, ... Several types share one read of the checkpoint "
    "and one base conversion. gguf:auto:size=N (bytes; KB/MB/GB) or gguf:auto:bpw=X "
    "[:types=Q4_K,Q5_K,...]: the per-tensor mix of least predicted KLD within that budget "
    "(needs --calib or --imatrix). vLLM checkpoints (compressed-tensors, via llm-compressor): "
    "gptq[:bits=4|8,group=32|64|128|channel,sym=true|false,actorder=static|group|weight|none,"
    "dampening=0.01], awq[:bits,group,sym,duo_scaling,grid=20], fp8[:dynamic|static|block]. "
    "A plain HF checkpoint folder (safetensors; --adapter merged): hf[:bf16|fp16|f32,shard=5GB].",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="A .gguf file (one --to) or a directory (default: current directory).",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option(
    "--name",
    default=None,
    help="GGUF targets from an HF checkpoint: the model's name (general.name) and the output "
    "file stem (default: the model's name in config.json, else its folder's).",
)
@click.option(
    "--allow-pickle",
    is_flag=True,
    help="Accept pytorch_model.bin checkpoints (loaded with torch.load(weights_only=True)).",
)
@click.option(
    "--clamp-f16",
    is_flag=True,
    help="F16 targets: clamp weights beyond ±65504 (with a warning listing them) instead of "
    "refusing; BF16 keeps them without clamping.",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Threads for quantizing (vLLM targets: default 1 on CPU-only hosts, which keeps "
    "GPTQ/AWQ output bytes reproducible).",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    help="PEFT LoRA adapter folder: merged into MODEL (the base) while converting; "
    "--to gguf-lora writes the adapter itself as a GGUF LoRA for the base's GGUF.",
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    help="Calibration text: compute an importance matrix on the way.",
)
@click.option(
    "--imatrix",
    "imatrix_file",
    type=click.Path(path_type=Path),
    help="Reuse an importance matrix (llama.cpp imatrix GGUF).",
)
@click.option(
    "--ctx",
    type=click.IntRange(min=8),
    default=512,
    show_default=True,
    help="Importance matrix: tokens per chunk.",
)
@click.option(
    "--chunks",
    type=click.IntRange(min=1),
    default=None,
    help="Importance matrix: chunks of calibration text (default: all).",
)
@click.option(
    "--tensor-type",
    "overrides",
    multiple=True,
    metavar="REGEX=TYPE",
    help="Per-tensor type override, repeatable, e.g. 'attn_v=q6_k'.",
)
@click.option("--output-type", metavar="TYPE", help="Type of output.weight (e.g. q8_0).")
@click.option("--embedding-type", metavar="TYPE", help="Type of token_embd.weight (e.g. q8_0).")
@click.option(
    "--pure",
    is_flag=True,
    help="Every quantizable tensor in the file type's main type (no K-quant mixes).",
)
@click.option("--leave-output", is_flag=True, help="Leave output.weight unquantized.")
@click.option(
    "--no-fallback",
    is_flag=True,
    help="Fail if a tensor cannot get its type (e.g. K-quant rows not divisible by 256).",
)
@click.option(
    "--dry-run",
    is_flag=True,
    help="Print the planned per-tensor types and predicted sizes; write nothing.",
)
@click.option(
    "--converter",
    type=click.Choice(["auto", "native", "upstream"]),
    default="auto",
    show_default=True,
    help="native: quantkit's architecture classes; upstream: llama.cpp's own "
    "convert_hf_to_gguf.py of the engine's version; auto: native where a class exists "
    "(`quantkit archs` lists both).",
)
@click.option(
    "--ignore",
    "ignore",
    multiple=True,
    metavar="NAME|re:REGEX",
    help="vLLM targets: leave these Linear layers unquantized, repeatable (default: lm_head).",
)
@click.option(
    "--layout",
    "layouts",
    multiple=True,
    type=click.Choice(["compressed-tensors", "legacy"]),
    help="vLLM targets: checkpoint layout, repeatable (default compressed-tensors; legacy: "
    "quant_method gptq/awq as AutoGPTQ/AutoAWQ wrote them). Both come from one quantization.",
)
@click.option(
    "--samples",
    type=click.IntRange(min=1),
    default=None,
    help="vLLM targets: calibration samples (default 16).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=16),
    default=None,
    help="vLLM targets: tokens per calibration sample (default 256).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    model: Path,
    targets: tuple[str, ...],
    output: Path | None,
    force: bool,
    name: str | None,
    allow_pickle: bool,
    clamp_f16: bool,
    threads: int | None,
    adapter: Path | None,
    calib: Path | None,
    imatrix_file: Path | None,
    ctx: int,
    chunks: int | None,
    overrides: tuple[str, ...],
    output_type: str | None,
    embedding_type: str | None,
    pure: bool,
    leave_output: bool,
    no_fallback: bool,
    dry_run: bool,
    converter: str,
    as_json: bool,
    ignore: tuple[str, ...] = (),
    layouts: tuple[str, ...] = (),
    samples: int | None = None,
    seq_len: int | None = None,
) -> None:
    """Convert a Hugging Face checkpoint (MODEL: a local folder or a Hub id, org/name[@revision])
    to GGUF, quantized by llama.cpp, or to a vLLM checkpoint (GPTQ, AWQ, FP8) quantized by
    llm-compressor."""
    from quantkit.hub import resolve_model

    model = resolve_model(model)
    from quantkit.convert.hf_checkpoint import is_hf_target
    from quantkit.quantize.vllm_targets import is_vllm_target

    hf_targets = [t for t in targets if is_hf_target(t)]
    if hf_targets:
        _convert_hf(model, hf_targets, output, adapter, force=force,
                    only=len(targets) == 1, as_json=as_json, dry_run=dry_run)  # fmt: skip
        targets = tuple(t for t in targets if not is_hf_target(t))
        if not targets:
            return
    vllm_targets = [t for t in targets if is_vllm_target(t)]
    if vllm_targets:
        _convert_vllm(
            model,
            vllm_targets,
            output,
            force=force,
            threads=threads,
            calib=calib,
            ignore=ignore,
            layouts=layouts,
            samples=samples,
            seq_len=seq_len,
            as_json=as_json,
            dry_run=dry_run,
        )
        targets = tuple(t for t in targets if not is_vllm_target(t))
        if not targets:
            return
    elif ignore or layouts or samples or seq_len:
        raise click.UsageError("--ignore, --layout, --samples and --seq-len apply to vLLM targets")
    from quantkit.convert import QuantSettings
    from quantkit.convert import convert as run_convert
    from quantkit.quantize.gguf import QuantizeOptions, ggml_type, parse_overrides

    for t in (output_type, embedding_type):
        if t:
            ggml_type(t)  # validate before any work
    qs = QuantSettings(
        options=QuantizeOptions(
            threads=threads,
            output_type=output_type,
            embedding_type=embedding_type,
            pure=pure,
            leave_output=leave_output,
            overrides=parse_overrides(overrides),
        ),
        imatrix_file=imatrix_file,
        calib=calib,
        calib_ctx=ctx,
        calib_chunks=chunks,
        no_fallback=no_fallback,
    )
    t0 = time.perf_counter()
    res = run_convert(
        model,
        targets,
        output,
        force=force,
        allow_pickle=allow_pickle,
        threads=threads,
        progress=ProgressPrinter(),
        quant=qs,
        dry_run=dry_run,
        converter=converter,
        clamp_f16=clamp_f16,
        adapter=adapter,
        name=name,
    )
    for w in res.warnings:
        click.echo(f"warning: {w}", err=True)
    if res.clamped_f16:
        items = sorted(res.clamped_f16.items(), key=lambda kv: -kv[1])
        click.echo(
            f"warning: --clamp-f16 clamped {len(items)} tensor(s) to ±65504: "
            + ", ".join(f"{n} (max |x| {v:.4g})" for n, v in items),
            err=True,
        )
    if res.converter == "upstream":
        click.echo(
            "quantkit: converted with llama.cpp's own convert_hf_to_gguf.py ("
            + (
                "--converter upstream)"
                if converter == "upstream"
                else "fallback: quantkit has no native class for this architecture)"
            ),
            err=True,
        )
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if res.imatrix is not None:
        _echo_expert_coverage(res.imatrix, table=not as_json)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "architecture": res.architecture,
                    "converter": res.converter,
                    "notes": res.notes,
                    **({"imatrix": _imatrix_json(res.imatrix)} if res.imatrix is not None else {}),
                    "dry_run": dry_run,
                    "artifacts": [a.to_json() for a in res.artifacts],
                    "unused_tensors": res.unused_tensors,
                    "clamped_f16": res.clamped_f16,
                    "timings": {k: round(v, 3) for k, v in res.timings.items()},
                    "seconds": round(time.perf_counter() - t0, 3),
                },
                indent=2,
            )
        )
        return
    autos = [a for a in res.artifacts if a.auto is not None]
    if dry_run and autos:
        _echo_auto_plans(autos)
        if len(autos) == len(res.artifacts):
            return
    if dry_run:
        for a in res.artifacts:
            if a.auto is not None:
                continue
            click.echo(
                f"{a.type}: {len(a.planned or {})} tensors, predicted {human_bytes(a.size)} → {a.path}"
            )
            hist: dict[str, int] = {}
            for t in (a.planned or {}).values():
                hist[t] = hist.get(t, 0) + 1
            click.echo(
                "  types: "
                + ", ".join(f"{k} ×{v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1]))
            )
            if a.fallbacks:
                click.echo(
                    f"  fallbacks: {len(a.fallbacks)} (e.g. {a.fallbacks[0].tensor} {a.fallbacks[0].wanted}→{a.fallbacks[0].got})"
                )
        plain = [a for a in res.artifacts if a.auto is None]
        click.echo("\nper tensor:")
        names = list((plain[0].planned or {}).keys())
        click.echo(
            format_table(
                ["tensor"] + [a.type for a in plain],
                [[n] + [(a.planned or {}).get(n, "") for a in plain] for n in names],
            )
        )
        return
    rows = []
    for a in res.artifacts:
        au = a.audit
        rows.append(
            [
                a.type,
                human_bytes(a.size),
                f"{au.bpw:.2f}" if au else "",
                str(len(au.fallbacks)) if au else "",
                f"{a.seconds:.1f}s",
                str(a.path),
            ]
        )
    click.echo(format_table(["type", "size", "bits/weight", "fallbacks", "time", "path"], rows))
    for a in res.artifacts:
        if a.audit and a.audit.fallbacks:
            f = a.audit.fallbacks
            click.echo(
                f"{a.type}: {len(f)} tensor(s) fell back, e.g. {f[0].tensor} {f[0].wanted}→{f[0].got} "
                f"({f[0].ncols} cols not a multiple of {f[0].block}); `quantkit inspect {a.path}` lists all",
                err=True,
            )
    if res.unused_tensors:
        click.echo(
            f"note: {len(res.unused_tensors)} checkpoint tensor(s) not needed by llama.cpp: "
            + ", ".join(res.unused_tensors[:5]),
            err=True,
        )


def _convert_hf(
    model: Path,
    targets: list[str],
    output: Path | None,
    adapter: Path | None,
    *,
    force: bool,
    only: bool,
    as_json: bool,
    dry_run: bool,
) -> None:
    """``convert --to hf[:DTYPE]``: a plain HF checkpoint folder (convert/hf_checkpoint.py);
    ``-o`` names it when it is the only target (as for the vLLM checkpoints), else holds it."""
    from quantkit.convert.hf_checkpoint import write_hf_checkpoint

    if dry_run:
        raise click.UsageError("--dry-run applies to GGUF targets")
    arts = [
        write_hf_checkpoint(model, t, output, adapter=adapter, force=force,
                            out_is_folder=only, progress=ProgressPrinter())
        for t in targets
    ]  # fmt: skip
    if as_json:
        click.echo(json.dumps({"artifacts": [a.to_json() for a in arts]}, indent=2))
        return
    click.echo(
        format_table(
            ["type", "size", "tensors", "shards", "time", "path"],
            [[a.type, human_bytes(a.size), str(a.n_tensors), str(a.n_shards),
              f"{a.seconds:.1f}s", str(a.path)] for a in arts],
        )
    )  # fmt: skip


def _echo_auto_plans(autos: list) -> None:
    """gguf:auto dry run: the budget, the predicted size (exact) and KLD, each tensor's type."""
    for a in autos:
        p = a.auto
        sens = p["sensitivity"]
        click.echo(
            f"{a.type}: predicted {p['predicted_bytes']:,} bytes ({human_bytes(p['predicted_bytes'])}), "
            f"{p['predicted_bpw']:.3f} bits per weight, predicted mean KLD {p['predicted_kld']:.4g} → {a.path}"
        )
        click.echo(
            "  types: " + ", ".join(f"{k} ×{v}" for k, v in p["histogram"].items())
            + f"; sensitivity {'from the cache' if sens['cache_hit'] else 'measured'}"
            + ("" if sens["gains"] else " (no --calib text: per-kind gains not measured, raw proxy)")
        )  # fmt: skip
        click.echo("\nper tensor:")
        click.echo(
            format_table(
                ["tensor", "type", "predicted KLD"],
                [[n, t, f"{p['tensor_kld'][n]:.3g}"] for n, t in p["types"].items()],
            )
        )


def _echo_vllm_auto_plans(model: Path, targets: list[str], settings: Any, as_json: bool) -> None:
    """gptq:auto dry run: per fused group its scheme, bits and predicted KLD; the average."""
    from quantkit.quantize.vllm_auto.plan import make_plan
    from quantkit.quantize.vllm_auto.spec import parse_vllm_auto

    plans = []
    for t in targets:
        spec = parse_vllm_auto(t)
        plan, _ = make_plan(model, spec, ignore=settings.ignore, calib=settings.calib,
                            samples=settings.samples, seq_len=settings.seq_len,
                            threads=settings.threads, progress=ProgressPrinter())  # fmt: skip
        plans.append((spec, plan.to_json()))
    if as_json:
        click.echo(
            json.dumps({"dry_run": True, "plans": {s.label(): p for s, p in plans}}, indent=2)
        )
        return
    for spec, p in plans:
        for note in p["notes"]:
            click.echo(f"note: {spec.label()}: {note}", err=True)
        click.echo(
            f"{spec.label()}: predicted {p['predicted_bits']:.3f} bits per weight "
            f"({p['bits_asked']:g} asked), predicted KLD {p['predicted_kld']:.4g}; candidates "
            f"{', '.join(p['candidates'])}; "
            + ", ".join(f"{k} ×{v}" for k, v in p["histogram"].items())
        )
        click.echo(
            format_table(
                ["group", "scheme", "bits", "predicted KLD"],
                [[g["group"], g["scheme"], f"{g['bits']:.3f}", f"{g['predicted_kld']:.3g}"]
                 for g in p["groups"]],
            )
        )  # fmt: skip


def _convert_vllm(
    model: Path,
    targets: list[str],
    output: Path | None,
    *,
    force: bool,
    threads: int | None,
    calib: Path | None,
    ignore: tuple[str, ...],
    layouts: tuple[str, ...],
    samples: int | None,
    seq_len: int | None,
    as_json: bool,
    dry_run: bool,
) -> None:
    """``convert --to gptq|awq|fp8``: llm-compressor in its own environment (quantize/vllm.py)."""
    from quantkit.quantize import vllm
    from quantkit.quantize.vllm_auto.spec import is_vllm_auto

    if dry_run and not all(is_vllm_auto(t) for t in targets):
        raise click.UsageError("--dry-run applies to GGUF targets and gptq:auto")
    settings = vllm.VllmSettings(
        ignore=ignore or vllm.DEFAULT_IGNORE,
        layouts=layouts or ("compressed-tensors",),
        calib=calib,
        samples=samples or vllm.DEFAULT_SAMPLES,
        seq_len=seq_len or vllm.DEFAULT_SEQ_LEN,
        threads=threads,
    )
    if dry_run:
        _echo_vllm_auto_plans(model, targets, settings, as_json)
        return
    res = vllm.export_vllm(
        model, targets, output, settings, force=force, progress=ProgressPrinter()
    )
    for note in res.notes:
        click.echo(f"quantkit convert: note: {note}", err=True)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "architecture": res.plan.architecture,
                    "artifacts": [a.to_json() for a in res.artifacts],
                    "memory_estimate": res.plan.memory_estimate,
                    "peak_rss": res.worker.get("peak_rss"),
                    "versions": res.worker.get("versions"),
                    "timings": {k: round(v, 3) for k, v in res.timings.items()},
                    "notes": res.notes,
                },
                indent=2,
            )
        )
        return
    click.echo(
        format_table(
            ["type", "layout", "quant_method", "size", "quantized layers", "time", "path"],
            [
                [
                    a.type,
                    a.layout,
                    a.quant_method,
                    human_bytes(a.size),
                    f"{a.quantized_layers} ({len(a.ignored_layers)} left in float)",
                    f"{a.seconds:.1f}s",
                    str(a.path),
                ]
                for a in res.artifacts
            ],
        )
    )


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def types(as_json: bool) -> None:
    """List the GGUF types quantkit writes, with nominal bits per weight."""
    from quantkit.quantize.types import GGUF_TYPES

    rows = [
        {
            "type": t.name,
            "main_tensor_type": t.main.name,
            "bits_per_weight": t.bpw,
            "needs_imatrix": t.imatrix,
            "made_by": "converter" if t.base else "llama.cpp quantizer",
        }
        for t in GGUF_TYPES.values()
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    click.echo(
        format_table(
            ["type", "main tensor type", "bits/weight", "importance matrix", "made by"],
            [
                [
                    r["type"],
                    r["main_tensor_type"],
                    f"{r['bits_per_weight']:.4g}",
                    "required"
                    if r["needs_imatrix"]
                    else "optional"
                    if r["made_by"] != "converter"
                    else "-",
                    r["made_by"],
                ]
                for r in rows
            ],
        )
    )
    click.echo("\nbits/weight is the main type's; K-quant mixes put some tensors in larger types.")


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print as JSON.")
def archs(as_json: bool) -> None:
    """List the architectures that convert: quantkit's native classes, then those llama.cpp's
    own converter (of the engine's version) knows, used as the fallback."""
    import gguf

    from quantkit.convert.archs import REGISTRY
    from quantkit.convert.upstream import engine_version, known_architectures

    version = engine_version()
    upstream = set(known_architectures())
    rows = [
        {"architecture": name, "converter": "native",
         "gguf_arch": gguf.MODEL_ARCH_NAMES[cls.gguf_arch], "upstream_knows": name in upstream}
        for name, cls in sorted(REGISTRY.items())
    ]  # fmt: skip
    rows += [
        {"architecture": name, "converter": "upstream", "gguf_arch": None, "upstream_knows": True}
        for name in sorted(upstream - set(REGISTRY))
    ]
    if as_json:
        click.echo(json.dumps({"llama_cpp_python": version, "architectures": rows}, indent=2))
        return
    click.echo(
        format_table(
            ["architecture", "converter", "gguf arch"],
            [
                [r["architecture"], r["converter"] if r["converter"] == "native" else
                 "llama.cpp (fallback)", r["gguf_arch"] or ""]
                for r in rows
            ],
        )
    )  # fmt: skip
    n_native = sum(r["converter"] == "native" for r in rows)
    click.echo(
        f"\n{n_native} native, {len(rows) - n_native} through llama.cpp's convert_hf_to_gguf.py "
        f"(llama-cpp-python {version}); `quantkit convert --converter` chooses."
    )


@cli.command(
    epilog="""\b
Examples:
  quantkit imatrix ./my-model --calib calib.txt -o my-model.imatrix.gguf
  quantkit imatrix ./my-model --calib calib.txt --ctx 512 --chunks 20 -o im.gguf
  quantkit convert ./my-model --to gguf:IQ4_XS --imatrix im.gguf -o out/
"""
)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--calib", type=click.Path(path_type=Path), required=True, help="Calibration text file."
)
@click.option(
    "-o", "--output", type=click.Path(path_type=Path), required=True, help="imatrix GGUF to write."
)
@click.option(
    "--ctx", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per chunk."
)
@click.option(
    "--chunks", type=click.IntRange(min=1), default=None, help="Number of chunks (default: all)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None)
@click.option("--force", is_flag=True, help="Overwrite an existing output.")
def imatrix(
    model: Path,
    calib: Path,
    output: Path,
    ctx: int,
    chunks: int | None,
    threads: int | None,
    force: bool,
) -> None:
    """Compute an importance matrix (llama.cpp's imatrix GGUF) from calibration text, in torch."""
    from quantkit.atomic import check_writable
    from quantkit.checkpoint import Checkpoint
    from quantkit.convert.archs import resolve
    from quantkit.errors import InputError
    from quantkit.hub import resolve_model
    from quantkit.quantize.imatrix import collect_imatrix, save_imatrix

    check_writable(output, force=force)
    if not calib.is_file():
        raise InputError(f"{calib}: calibration text not found")
    model = resolve_model(model)
    with Checkpoint.open(model) as ck:
        # unsupported architectures fail before the model is loaded
        resolve(ck.config, ck.path / "config.json")
    im = collect_imatrix(
        model,
        read_text(calib),
        ctx=ctx,
        chunks=chunks,
        threads=threads,
        progress=ProgressPrinter(),
    )
    save_imatrix(im, output)
    click.echo(f"wrote {output}: {len(im.entries)} tensors, {im.chunks} chunks of {ctx} tokens")
    _echo_expert_coverage(im)


def _imatrix_json(im: Any) -> dict[str, Any]:
    return {
        "entries": len(im.entries),
        "chunks": im.chunks,
        "expert_coverage": im.expert_coverage(),  # tensor -> tokens per expert
        "unrouted_experts": im.unrouted(),  # tensor -> experts that saw no token
    }


def _echo_expert_coverage(im: Any, *, table: bool = True) -> None:
    """MoE: tokens per expert, one row per layer (gate/up/down of a layer share the routing);
    experts never routed to get a note on stderr."""
    cov = im.expert_coverage()
    if not cov:
        return
    layers: dict[str, list[int]] = {}
    for name, counts in cov.items():
        layers.setdefault(name.split(".ffn_")[0], counts)
    rows = [
        [layer, " ".join(str(c) for c in counts),
         ", ".join(str(i) for i, c in enumerate(counts) if c == 0) or "-"]
        for layer, counts in layers.items()
    ]  # fmt: skip
    if table:
        click.echo("importance matrix, tokens per expert:")
        click.echo(format_table(["layer", "tokens per expert", "never routed"], rows))
    n = sum(c == 0 for counts in layers.values() for c in counts)
    if n:
        click.echo(
            f"note: {n} expert(s) saw no calibration token; llama.cpp quantizes them with uniform "
            "importance (as without an imatrix). More or more varied calibration text covers them.",
            err=True,
        )


@cli.command(epilog=EPILOG_INSPECT)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option("--all", "show_all", is_flag=True, help="List every tensor (default: first 40).")
def inspect(path: Path, as_json: bool, show_all: bool) -> None:
    """Show a GGUF file's metadata and tensor table, with totals and bits per weight."""
    from quantkit.gguf_file import read_gguf
    from quantkit.quantize.audit import audit

    info = read_gguf(path)
    aud = audit(path, info=info)
    if as_json:
        d = info.to_json()
        d["audit"] = {k: v for k, v in aud.to_json().items() if k != "tensors"}
        click.echo(json.dumps(d, indent=2, default=str))
        return
    meta_rows = []
    for k, v in info.metadata.items():
        s = str(v)
        meta_rows.append([k, s if len(s) <= 70 else s[:67] + "..."])
    for k, (ty, n) in info.arrays.items():
        meta_rows.append([k, f"[{n} × {ty}]"])
    click.echo(f"{path}  (GGUF v{info.version}, {human_bytes(info.size)})\n")
    click.echo(format_table(["key", "value"], meta_rows))
    tensors = info.tensors if show_all else info.tensors[:40]
    click.echo("")
    click.echo(
        format_table(
            ["tensor", "type", "shape", "bytes"],
            [[t.name, t.type, "×".join(map(str, t.shape)), human_bytes(t.nbytes)] for t in tensors],
        )
    )
    if len(tensors) < len(info.tensors):
        click.echo(f"... {len(info.tensors) - len(tensors)} more (--all)")
    hist = ", ".join(f"{k}: {v}" for k, v in info.type_histogram().items())
    click.echo(
        f"\n{len(info.tensors)} tensors, {info.n_params:,} parameters, "
        f"{human_bytes(info.tensor_bytes)} of tensor data, {info.bpw:.2f} bits per weight "
        f"({aud.file_bpw:.2f} for the whole file); types: {hist}"
    )
    if aud.fallbacks:
        click.echo(f"\n{len(aud.fallbacks)} fallback(s) ({aud.fallback_source}):")
        click.echo(
            format_table(
                ["tensor", "wanted", "got", "row", "block"],
                [[f.tensor, f.wanted, f.got, str(f.ncols), str(f.block)] for f in aud.fallbacks],
            )
        )


EPILOG_VALIDATE = """\b
Examples:
  quantkit validate out/m-Q8_0.gguf out/m-Q4_K_M.gguf --reference ./m --data wiki.test.raw
  quantkit validate out/*.gguf --reference ./m --data eval.txt --ctx 512 --chunks 20 \\
      --json report.json --md report.md --plot report.png
  quantkit validate out/m-Q4_K_M.gguf --reference ./m --data eval.txt \\
      --max-kld 0.05 --max-ppl-increase 5 --min-top1 85     # CI gate: exit 1 if one fails
  quantkit validate out/m-W4A16/ out/m-Q4_K_M.gguf --reference ./m --data eval.txt
      # a compressed-tensors/GPTQ/AWQ folder is scored in vLLM (`quantkit engines setup vllm`)
  quantkit validate ./m out/m-F16.gguf --engine vllm --reference ./m --data eval.txt
\b
Exit codes: 0 every gate holds, 1 a gate failed or an artifact was too slow for --max-minutes
(the table and report say which), 2 bad input or an artifact/reference that could not be scored.
"""


@cli.command(epilog=EPILOG_VALIDATE)
@click.argument("artifacts", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option(
    "--reference",
    type=click.Path(path_type=Path),
    required=True,
    help="The original Hugging Face checkpoint (folder); its tokenizer tokenizes the text.",
)
@click.option(
    "--data", type=click.Path(path_type=Path), required=True, help="Evaluation text file."
)
@click.option(
    "--ctx", type=click.IntRange(min=8), default=512, show_default=True, help="Tokens per chunk."
)
@click.option(
    "--chunks", type=click.IntRange(min=1), default=None, help="Number of chunks (default: all)."
)
@click.option("--threads", type=click.IntRange(min=1), default=None, help="Engine threads.")
@click.option(
    "--pp", type=click.IntRange(min=0), default=512, show_default=True, help="Speed: prompt tokens."
)
@click.option(
    "--tg",
    type=click.IntRange(min=0),
    default=128,
    show_default=True,
    help="Speed: generated tokens.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=3600,
    show_default=True,
    help="Seconds per engine process before it is killed and its artifact failed.",
)
@click.option(
    "--max-minutes",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Time budget per artifact (load, scoring, speed): past it, or once the measured rate "
    "projects far beyond it, the artifact is reported too-slow with its rate (exit 1).",
)
@click.option(
    "--reference-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="Run the reference in this dtype (default: the checkpoint's own).",
)
@click.option("--kv-f32", is_flag=True, help="llama.cpp: F32 KV cache (default F16).")
@click.option(
    "--no-flash-attn",
    is_flag=True,
    help="llama.cpp: no flash attention (default on, as llama-perplexity has it on CPU).",
)
@click.option("--no-cache", is_flag=True, help="Do not read or write the reference cache.")
@click.option(
    "--engine",
    "hf_engine",
    type=click.Choice(["transformers", "vllm"]),
    default=None,
    help="Engine for plain HF folders (default transformers; quantized folders always use vLLM).",
)
@click.option(
    "--topk",
    type=click.IntRange(min=1, max=1000),
    default=20,
    show_default=True,
    help="vLLM: log-probs per position; KLD is approximated over these plus one tail bucket.",
)
@click.option(
    "--vllm-dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default=None,
    help="vLLM: run the model in this dtype (default: the checkpoint's own).",
)
@click.option(
    "--vllm-eager",
    is_flag=True,
    help="vLLM: no torch.compile (faster start, slower tokens/s than a deployed vLLM).",
)
@click.option(
    "--adapter",
    type=click.Path(path_type=Path),
    help="A fine-tune: the reference is REFERENCE (its base) plus this PEFT adapter.",
)
@click.option(
    "--lora-base",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Base of LoRA artifacts: a GGUF for GGUF LoRAs (--to gguf-lora, llama.cpp), an HF "
    "folder for vLLM LoRAs (--to vllm-lora; default: REFERENCE). Repeat to give both.",
)
@click.option("--json", "json_out", type=click.Path(path_type=Path), help="Write the JSON report.")
@click.option("--md", "md_out", type=click.Path(path_type=Path), help="Write a Markdown report.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), help="Write a PNG chart.")
@click.option("--max-kld", type=float, default=None, help="Gate: mean KLD at most this.")
@click.option(
    "--max-ppl-increase",
    type=float,
    default=None,
    metavar="PCT",
    help="Gate: PPL at most this many percent above the reference's.",
)
@click.option(
    "--min-top1", type=float, default=None, metavar="PCT", help="Gate: top-1 agreement, percent."
)
@click.option(
    "--default-gates",
    is_flag=True,
    help="Apply the per-type default gates (docs/report-schema.md) where no option is given.",
)
def validate(
    artifacts: tuple[Path, ...],
    reference: Path,
    data: Path,
    ctx: int,
    chunks: int | None,
    threads: int | None,
    pp: int,
    tg: int,
    timeout: float,
    max_minutes: float | None,
    reference_dtype: str | None,
    kv_f32: bool,
    no_flash_attn: bool,
    no_cache: bool,
    hf_engine: str | None,
    topk: int,
    vllm_dtype: str | None,
    vllm_eager: bool,
    adapter: Path | None,
    lora_base: tuple[Path, ...],
    json_out: Path | None,
    md_out: Path | None,
    plot_out: Path | None,
    max_kld: float | None,
    max_ppl_increase: float | None,
    min_top1: float | None,
    default_gates: bool,
) -> None:
    """Score ARTIFACTS (GGUF files, HF folders) against the REFERENCE checkpoint on the same
    token ids: perplexity, KL divergence, top-1 agreement, speed and memory, each in its engine."""
    from quantkit.errors import GateFailed
    from quantkit.validate.harness import Gates, Settings, ValidationError, split_lora_bases
    from quantkit.validate.harness import validate as run_validate
    from quantkit.validate.report import markdown, plot, terminal_table

    settings = Settings(
        ctx=ctx,
        chunks=chunks,
        threads=threads,
        pp=pp,
        tg=tg,
        timeout=timeout,
        max_minutes=max_minutes,
        reference_dtype=reference_dtype,
        kv_f32=kv_f32,
        flash_attn=not no_flash_attn,
        cache=not no_cache,
        gates=Gates(max_kld, max_ppl_increase, min_top1, default_gates),
        hf_engine=hf_engine,
        topk=topk,
        vllm_dtype=vllm_dtype,
        vllm_eager=vllm_eager,
        adapter=adapter,
    )
    settings.lora_base, settings.vllm_lora_base = split_lora_bases(lora_base)
    from quantkit.hub import resolve_model

    reference = resolve_model(reference)
    report = run_validate(list(artifacts), reference, data, settings, progress=ProgressPrinter())
    for out, body in (
        (json_out, lambda: json.dumps(report, indent=2)),
        (md_out, lambda: markdown(report)),
    ):
        if out:  # whole or absent, never half-written (quantkit/atomic.py)
            with atomic_output(out, force=True) as tmp:
                tmp.write_text(body())
    if plot_out:
        plot(report, plot_out)
    click.echo(terminal_table(report))
    if report["failed_artifacts"]:
        raise ValidationError(
            f"{len(report['failed_artifacts'])} artifact(s) could not be scored: "
            + ", ".join(report["failed_artifacts"])
        )
    slow = [a for a in report["artifacts"] if a["status"] == "too-slow"]
    if report["failed_gates"] or slow:
        raise GateFailed(
            "; ".join(
                [
                    f"gate failed: {g['artifact']} --{g['gate']} {g['threshold']:g} "
                    f"(measured {g['value']})"
                    for g in report["failed_gates"]
                ]
                + [f"{a['name']}: {a['error']}" for a in slow]
            ),
            "raise --max-minutes, or validate on a faster host" if slow else None,
        )


# `quantkit engines …` lives in its own module (quantkit/cli_engines.py)
from quantkit.cli_engines import engines  # noqa: E402

cli.add_command(engines)

# `quantkit recipes …`, `run`, `report merge`, `demo` (quantkit/cli_recipes.py)
from quantkit.cli_recipes import demo, recipes, report, run  # noqa: E402

for _cmd in (recipes, run, report, demo):
    cli.add_command(_cmd)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Interrupted("interrupted by SIGTERM")


def main(argv: list[str] | None = None) -> None:
    debug = os.environ.get("QUANTKIT_DEBUG") == "1"
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        cli.main(args=argv, prog_name="quantkit", standalone_mode=False)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        cleanup_all()
        click.echo("quantkit: interrupted", err=True)
        sys.exit(130)
    except (QuantkitError, KeyboardInterrupt) as e:
        cleanup_all()
        if debug:
            raise
        msg = str(e) if isinstance(e, QuantkitError) else "interrupted"
        click.echo(f"quantkit: error: {msg}", err=True)
        sys.exit(exit_code_for(e))
    except Exception as e:
        cleanup_all()
        if debug:
            raise
        click.echo(
            f"quantkit: internal error: {type(e).__name__}: {e} — rerun with QUANTKIT_DEBUG=1 for a traceback",
            err=True,
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
