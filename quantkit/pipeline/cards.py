"""The model card (README.md) of each target: how it was made, what it measured, how to run it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from quantkit.pipeline.context import Context, write_atomic
from quantkit.recipe import validated

# The measured values a model card shows: (label, key in the report's artifact entry, format).
# Each row names its report.json key, so a reader (and tests/test_run_checks.py) can find it.
CARD_METRICS: tuple[tuple[str, str, str], ...] = (
    ("perplexity", "quality.ppl", ".4g"),
    ("perplexity increase over the reference, %", "quality.ppl_increase_pct", ".3g"),
    ("mean KL divergence from the reference", "quality.kld_mean", ".4g"),
    ("99th-percentile KL divergence", "quality.kld_p99", ".4g"),
    ("top-1 token agreement with the reference, %", "quality.top1_pct", ".3g"),
    ("bits per weight", "size.bits_per_weight", ".4g"),
    ("prompt processing, tokens/s", "speed.pp_tps", ".1f"),
    ("generation, tokens/s", "speed.tg_tps", ".1f"),
)
PROMPT = "Once upon a time"
RUN_CTX = 2048  # the context the cards' commands ask for, at most the model's own


def _run_ctx(ctx: Context) -> int:
    """RUN_CTX, or less for a model trained on a shorter context (vLLM refuses a max_model_len
    above config.json's max_position_embeddings)."""
    try:
        cfg = json.loads((ctx.model / "config.json").read_text())
    except (OSError, ValueError):
        return RUN_CTX
    cfg = cfg.get("text_config", cfg) if isinstance(cfg, dict) else {}
    n = cfg.get("max_position_embeddings") if isinstance(cfg, dict) else None
    return min(RUN_CTX, int(n)) if isinstance(n, int) and n > 0 else RUN_CTX


def _dig(d: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None  # type: ignore[assignment]
    return d


def _validate_command(ctx: Context, t: Any, name: str) -> str:
    """The `quantkit validate` line that repeats this target's measurement (same reference,
    text, settings and gates; paths as on the machine that ran the recipe)."""
    import shlex

    v = ctx.recipe.validation
    assert v is not None and ctx.vdata is not None
    g = ctx.recipe.gates.merged(t.gates)
    args = ["quantkit", "validate", name, "--reference", str(ctx.model), "--data", str(ctx.vdata),
            "--ctx", str(v.ctx), "--pp", str(v.pp), "--tg", str(v.tg)]  # fmt: skip
    opts = (
        ("--chunks", v.chunks), ("--threads", v.threads), ("--adapter", ctx.adapter),
        ("--max-minutes", v.max_minutes),
        ("--max-kld", g.max_kld), ("--max-ppl-increase", g.max_ppl_increase_pct),
        ("--min-top1", g.min_top1_pct),
    )  # fmt: skip
    args += [x for k, val in opts if val is not None for x in (k, str(val))]
    args += [
        f for f, on in (("--kv-f32", v.kv_f32), ("--default-gates", g.per_type_defaults)) if on
    ]
    return shlex.join([*args, "--json", "validate-check.json"])


def _run_section(ctx: Context, t: Any, name: str, gguf: bool) -> list[str]:
    """How to run the artifact: a Python snippet for the engine quantkit installs (llama-cpp-python
    in its venv, vLLM in its engine env), then the engines' own command lines."""
    import re

    n_ctx = _run_ctx(ctx)
    if gguf:
        ollama = re.sub(r"[^a-z0-9._-]+", "-", ctx.stem.lower()).strip("-.") or "model"
        lines = [
            "Python, with llama-cpp-python (installed with quantkit):",
            "",
            "```python",
            "from llama_cpp import Llama",
            "",
            f'llm = Llama(model_path="{name}", n_ctx={n_ctx}, verbose=False)',
            f'print(llm("{PROMPT}", max_tokens=32)["choices"][0]["text"])',
            "```",
            "",
            "llama.cpp's own tools and Ollama (installed separately):",
            "",
            "```sh",
            f"llama-cli -m {name} -p '{PROMPT}' -n 32",
            f"llama-server -m {name} --port 8080",
            f"printf 'FROM ./{name}\\n' > Modelfile",
            f"ollama create {ollama} -f Modelfile",
            f"ollama run {ollama} '{PROMPT}'",
            "```",
            "",
            "vLLM loads GGUF files experimentally (llama-family models; the tokenizer from the "
            "source model); for vLLM prefer this recipe's AWQ/GPTQ/FP8 targets:",
            "",
            "```sh",
            f"vllm serve ./{name} --tokenizer {ctx.model}",
            "```",
        ]
    else:
        lines = [
            "Python, with vLLM (quantkit's copy is the `vllm` environment that "
            "`quantkit engines status` lists; run this with its python):",
            "",
            "```python",
            "from vllm import LLM, SamplingParams",
            "",
            'if __name__ == "__main__":  # vLLM starts its engine in a spawned child process',
            "    # a fixed KV cache: by default vLLM reserves ~90% of the memory (of the RAM on CPU)",
            f'    llm = LLM(model="./{name}", max_model_len={n_ctx}, kv_cache_memory_bytes=1 << 30)',
            f'    out = llm.generate(["{PROMPT}"], SamplingParams(max_tokens=32))',
            "    print(out[0].outputs[0].text)",
            "```",
            "",
            "An OpenAI-compatible server (the quantization is read from config.json):",
            "",
            "```sh",
            f"vllm serve ./{name} --max-model-len {n_ctx} --kv-cache-memory-bytes 1G",
            "```",
        ]
    if validated(ctx.recipe, t):
        lines += [
            "",
            "Repeat the measurement (quantkit; paths as on the machine that ran the recipe):",
            "",
            "```sh",
            _validate_command(ctx, t, name),
            "```",
        ]
    return lines


def _format_line(entry: dict[str, Any], m: dict[str, Any]) -> str:
    """The format with its bits per weight, and the kernels the engine said it used."""
    size, eng = entry.get("size") or {}, entry.get("engine") or {}
    bpw = size.get("bits_per_weight")
    line = f"Format: {size.get('file_type') or m['type']}" + (
        f", {bpw:.4g} bits per weight (`size.bits_per_weight`)" if bpw else ""
    )
    if eng.get("kernels"):
        line += (
            f"; linear kernels the engine picked (`engine.kernels`): {', '.join(eng['kernels'])}"
        )
    return line + "."


def write_card(ctx: Context, t: Any, m: dict[str, Any]) -> None:
    """The model card: what the file is, how it was made, what it measured, how to run it."""
    if not m:
        return
    p = m["provenance"]
    gguf = m["format"] == "gguf"
    v = m.get("validation") or {}
    tools = ", ".join(f"{k} {val}" for k, val in sorted(p["tools"].items()))
    source = f"`{p['source']}`"
    if p.get("adapter"):
        source = f"the fine-tune `{p['adapter']}` (PEFT LoRA adapter on `{p['source']}`)"
    lines = [
        f"# {ctx.stem} — {m['type']} {'GGUF' if gguf else 'checkpoint for vLLM'}",
        "",
        f"`{m['artifact']}`: {m['type']} quantization of {source} for "
        f"{'llama.cpp' if gguf else 'vLLM'}, made by",
        f"quantkit from recipe `{p['recipe']}` (target `{t.name}`).",
        "",
        "## How it was made",
        "",
        f"- base model: `{p['source']}` (files sha256 `{p['source_sha256']}`)",
    ]
    if p.get("source_hub"):
        lines.append(
            f"- from the Hugging Face Hub: `{p['source_hub']['id']}` at commit "
            f"`{p['source_hub']['commit']}`"
        )
    if p.get("adapter"):
        lines.append(
            f"- adapter: `{p['adapter']}` (PEFT LoRA, merged; files sha256 `{p['adapter_sha256']}`)"
        )
    lines += [
        f"- recipe sha256: `{p['recipe_sha256']}`",
        f"- options: `{json.dumps(p['options'], sort_keys=True)}`",
        "- calibration: "
        + (f"sha256 `{p['calibration_sha256']}`" if p["calibration_sha256"] else "none"),
        f"- tools: {tools}",
        f"- size: {m['size']} bytes, sha256 `{m['sha256']}`",
        "",
        "## Measured",
        "",
    ]
    rp = ctx.target_dir(t) / "report.json"
    report = json.loads(rp.read_text()) if v and rp.is_file() else None
    entry = report["artifacts"][0] if report and report.get("artifacts") else None
    if v.get("unsupported_artifacts"):
        lines.append(f"Built, but not scorable on the host that ran the recipe: {v.get('error')}")
    elif v.get("too_slow_artifacts"):
        lines.append(f"Built, but not scored within the recipe's time budget: {v.get('error')}")
    elif entry is not None and report is not None:
        ref = report.get("reference", {})
        data = report.get("data", {})
        against = f"`{ref.get('model')}`" + (" + the adapter" if p.get("adapter") else "")
        lines += [
            f"In {entry.get('engine', {}).get('version', '?')}, against {against} in "
            f"{ref.get('engine', {}).get('version', 'transformers')}, on "
            f"{data.get('scored_tokens')} tokens of `{Path(data.get('path', '?')).name}` "
            f"(ctx {data.get('ctx')}, {data.get('chunks')} chunk(s)). Every value is in "
            "report.json under `artifacts[0]` at the key shown.",
            "",
            "| metric | report.json key | value |",
            "|---|---|---|",
        ]
        for label, key, spec in CARD_METRICS:
            val = _dig(entry, key)
            if isinstance(val, (int, float)):
                lines.append(f"| {label} | `{key}` | {format(val, spec)} |")
        lines += ["", _format_line(entry, m)]
        gates = "; ".join(
            f"{g['gate']} {g['threshold']:g} ({'passed' if g['passed'] else 'FAILED'})"
            for g in entry.get("gates") or []
        )
        lines += [
            "",
            f"Gates: {gates or 'none set'}; overall {'passed' if v.get('passed') else 'FAILED'}.",
            "",
            "Full report: report.md / report.json / report.png (docs/report-schema.md).",
        ]
    elif v:
        lines.append("Could not be scored: see report.md.")
    else:
        lines.append("Not validated by this recipe.")
    lines += ["", "## How to run", "", *_run_section(ctx, t, m["artifact"], gguf), ""]
    write_atomic(ctx.target_dir(t) / "README.md", "\n".join(lines))
