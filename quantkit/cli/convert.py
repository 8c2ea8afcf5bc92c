"""``quantkit convert``: every target kind from a folder, a Hub id or base + adapter.

The options become one ``ExportOptions`` and the ``--to`` texts one list of Target models
(quantkit/targets.py); quantkit/pipeline/build.py makes them, cli/render.py shows the result.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import click

from quantkit.cli import render
from quantkit.progress import ProgressPrinter

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
  quantkit convert ./my-model --to gptq:group=64,actorder=weight --layout legacy --calib c.txt
  quantkit convert ./my-model --to gptq --ignore lm_head --ignore 're:.*down_proj$' --calib c.txt
  quantkit convert ./my-model --to gptq:auto:bits=4.5 --calib calib.txt --dry-run

A plain HF checkpoint (safetensors; transformers and vLLM load it), e.g. a merged fine-tune:
  quantkit convert ./base --adapter ./my-lora --to hf:bf16 -o my-finetune/

Several kinds at once, from a Hub id (through the HF cache) or a fine-tune:
  quantkit convert Qwen/Qwen3-0.6B --to gguf:Q8_0 --to fp8 --to hf:bf16 -o out/
  quantkit convert ./base --adapter ./my-lora --to gguf:Q4_K_M --to gptq --calib c.txt -o out/
"""


@click.command(epilog=EPILOG_CONVERT)
@click.argument("model", type=click.Path(path_type=Path))
@click.option(
    "--to",
    "targets",
    multiple=True,
    required=True,
    metavar="gguf:TYPE|gguf:auto:size=N|bpw=X|gptq|gptq:auto:bits=X|awq|fp8|hf[:OPTIONS]",
    help="Output type, repeatable (case-insensitive; `quantkit types` lists them): gguf:F16, "
    "gguf:Q8_0, gguf:Q4_K_M, gguf:IQ4_XS, ... Several types share one read of the checkpoint "
    "and one base conversion. gguf:auto:size=N (bytes; KB/MB/GB) or gguf:auto:bpw=X "
    "[:types=Q4_K,Q5_K,...]: the per-tensor mix of least predicted KLD within that budget "
    "(needs --calib or --imatrix). vLLM checkpoints (compressed-tensors, via llm-compressor): "
    "gptq[:bits=4|8,group=32|64|128|channel,sym=true|false,actorder=static|weight|none,"
    "dampening=0.01], awq[:bits,group,sym,duo_scaling,grid=20], fp8[:dynamic|static|block]. "
    "A plain HF checkpoint folder (safetensors; --adapter merged): hf[:bf16|f16|f32,shard=5GB]. "
    "gptq:auto:bits=X[:types=w4g64,fp8,float,…][:force]: W4A16 / FP8 / float per fused layer "
    "group at an average bit width, from what this host's vLLM runs (needs --calib). "
    "The adapter itself: gguf-lora, vllm-lora.",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(path_type=Path),
    default=None,
    help="With one --to: the .gguf file or checkpoint folder itself (a folder name for a GGUF "
    "holds STEM-TYPE.gguf); with several: the directory holding them (default: current directory).",
)
@click.option("--force", is_flag=True, help="Overwrite existing output files.")
@click.option(
    "--name",
    default=None,
    help="The output stem (and a GGUF's general.name); default: the adapter's folder name for a "
    "fine-tune, else the model's name in config.json, else its folder's.",
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
    help="PEFT LoRA adapter folder: merged into MODEL (the base) for every target (streamed for "
    "GGUF and hf; a temporary merged copy for llm-compressor and --calib); --to gguf-lora / "
    "vllm-lora write the adapter itself.",
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
    default=None,
    help="Importance matrix: tokens per chunk (default 512, llama-imatrix's).",
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
    help="vLLM targets: calibration samples (default 16: a first artifact in minutes on a "
    "laptop; a recipe's release default is 64).",
)
@click.option(
    "--seq-len",
    type=click.IntRange(min=16),
    default=None,
    help="vLLM targets: tokens per calibration sample (default 256; a recipe's is 512).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def convert(
    model: Path,
    targets: tuple[str, ...],
    output: Path | None,
    as_json: bool,
    adapter: Path | None,
    overrides: tuple[str, ...],
    output_type: str | None,
    embedding_type: str | None,
    pure: bool,
    leave_output: bool,
    ctx: int | None,
    chunks: int | None,
    imatrix_file: Path | None,
    samples: int | None,
    seq_len: int | None,
    ignore: tuple[str, ...],
    layouts: tuple[str, ...],
    **options: Any,
) -> None:
    """Convert a Hugging Face checkpoint (MODEL: a local folder or a Hub id, org/name[@revision])
    to GGUF for llama.cpp, to a vLLM checkpoint (GPTQ, AWQ, FP8; quantized by llm-compressor) or
    to a plain HF checkpoint; several targets of any kinds in one run."""
    from quantkit.hub import resolve_model
    from quantkit.pipeline.build import ExportOptions, Source, build, with_options
    from quantkit.targets import IMATRIX_CTX, parse_targets

    ts = with_options(
        parse_targets(targets), overrides=overrides, output_type=output_type,
        embedding_type=embedding_type, pure=pure, leave_output=leave_output,
    )  # fmt: skip
    o = ExportOptions(
        **options, imatrix=imatrix_file, calib_ctx=ctx or IMATRIX_CTX, calib_chunks=chunks,
        samples=samples, seq_len=seq_len,  # None: not given (build refuses given vLLM-only options)
        ignore=ignore, layouts=layouts, progress=ProgressPrinter(),
    )  # fmt: skip
    t0 = time.perf_counter()
    with Source(resolve_model(model), adapter, o.name) as src:
        res = build(src, ts, output, o)
    render.show(res, o, as_json=as_json, seconds=time.perf_counter() - t0)
