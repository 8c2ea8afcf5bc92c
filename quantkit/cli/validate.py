"""``quantkit validate``: score artifacts against the reference in their own engines."""

from __future__ import annotations

import json
from pathlib import Path

import click

from quantkit.atomic import atomic_output
from quantkit.progress import ProgressPrinter

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


@click.command(epilog=EPILOG_VALIDATE)
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
    "--tensor-parallel-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="vLLM: tensor-parallel ranks (one GPU each on CUDA; on CPU one process each, on its own "
    "cores).",
)
@click.option(
    "--pipeline-parallel-size",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="vLLM: pipeline-parallel stages (ranks = tensor × pipeline).",
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
    "--no-chat",
    is_flag=True,
    help="Skip the chat check (on when the reference has a chat template: the same prompt ids "
    "and stop tokens in each artifact's serving path as in transformers; docs/chat.md).",
)
@click.option(
    "--require-chat",
    is_flag=True,
    help="Gate: exit 1 when an artifact's chat prompt ids or stop tokens differ from the "
    "reference's.",
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
    tensor_parallel_size: int,
    pipeline_parallel_size: int,
    adapter: Path | None,
    lora_base: tuple[Path, ...],
    json_out: Path | None,
    md_out: Path | None,
    plot_out: Path | None,
    max_kld: float | None,
    max_ppl_increase: float | None,
    min_top1: float | None,
    no_chat: bool,
    require_chat: bool,
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
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        adapter=adapter,
        chat=not no_chat,
        require_chat=require_chat,
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
    chat_failed = report["failed_chat"] if require_chat else []
    if report["failed_gates"] or slow or chat_failed:
        raise GateFailed(
            "; ".join(
                [
                    f"gate failed: {g['artifact']} --{g['gate']} {g['threshold']:g} "
                    f"(measured {g['value']})"
                    for g in report["failed_gates"]
                ]
                + [f"{a['name']}: {a['error']}" for a in slow]
                + [f"chat check failed: {name} (--require-chat)" for name in chat_failed]
            ),
            "raise --max-minutes, or validate on a faster host"
            if slow
            else "the notes above name each difference; docs/chat.md says how to fix it"
            if chat_failed
            else None,
        )
