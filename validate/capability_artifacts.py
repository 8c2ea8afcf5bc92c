"""Tiny artifacts for the capability matrix (``quantkit.validate.capabilities``), built once with
quantkit's own export code and cached by the hash of what they are.

Every artifact comes from a random tiny model (hidden 256, 2 layers, 512-token byte-level BPE)
built here from a transformers config: a Llama, or a Qwen3-MoE with 4 experts (2 active) for the
MoE rows. Widths are multiples of 128, so every group size (32/64/128) and FP8's 128×128 blocks
apply without fallbacks. The formats are made exactly as a user's would be: GGUF through
``convert`` (llama.cpp's quantizer), vLLM checkpoints through ``export_vllm`` (llm-compressor;
several targets of one model share one llm-compressor process), LoRA adapters through
``convert --to gguf-lora|vllm-lora`` from a PEFT adapter with non-zero weights.

Cache: ``<cache>/capabilities/artifacts/<hash>/`` — the hash covers ``BUILD_VERSION`` and the
artifact's spec; an entry is complete when its ``artifact.json`` exists (written inside the
temporary folder before the rename, quantkit/atomic.py), so an interrupted build is redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import shutil
import tempfile
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_dir, file_lock

BUILD_VERSION = "1"  # bump when the way an artifact is built changes (rebuilds the cache)
MARKER = "artifact.json"

# Small enough that a vLLM start is mostly vLLM's own fixed cost, large enough for K-quants
# (rows of 256) and FP8 blocks (128×128).
TINY: dict[str, Any] = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=512,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    initializer_range=0.1,
)
MOE: dict[str, Any] = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=256)
ARCHS = {"llama": "LlamaForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
DTYPES = {"f32": "float32", "f16": "float16", "bf16": "bfloat16"}

TEXT = (
    "Once upon a time there was a little robot named Bolt. Bolt liked to count: 1, 2, 3, 42. "
    "He lived in a small town with his friend Mia, who wrote code: def add(a, b): return a + b. "
    "Every day they walked to the river and watched the boats go by. "
) * 40

Say = Callable[[str], None]


@dataclass(frozen=True)
class Spec:
    """One artifact. ``kind``: "base" (HF folder), "gguf" (``gtype``), "adapter" (PEFT),
    "gguf-lora", "vllm-lora", "vllm" (``target`` in ``layout``)."""

    kind: str
    arch: str = "llama"
    dtype: str = "f32"
    gtype: str | None = None
    target: str | None = None
    layout: str = "compressed-tensors"

    def key(self) -> str:
        blob = json.dumps({"v": BUILD_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def root() -> Path:
    from quantkit.paths import capability_artifacts_dir

    return capability_artifacts_dir()


def _entry(spec: Spec) -> Path:
    return root() / spec.key()


def cached(spec: Spec) -> Path | None:
    """The artifact's path when its cache entry is complete."""
    d = _entry(spec)
    try:
        meta = json.loads((d / MARKER).read_text())
    except (OSError, ValueError):
        return None
    p = d / meta["path"]
    return p if p.exists() else None


def _store(spec: Spec, src: Path) -> Path:
    """Move a built artifact (file or folder) into its cache entry."""
    with atomic_dir(_entry(spec)) as tmp:
        shutil.move(str(src), tmp / src.name)
        (tmp / MARKER).write_text(json.dumps({"spec": asdict(spec), "path": src.name}))
    return _entry(spec) / src.name


def _save_tokenizer(out: Path, vocab_size: int) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    ).save_pretrained(out)


def _build_base(spec: Spec, out: Path) -> None:
    import torch
    import transformers

    arch = ARCHS[spec.arch]
    cfg_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    params = {**TINY, **(MOE if spec.arch == "qwen3moe" else {})}
    config = cfg_cls(**params)
    config.architectures = [arch]
    config.name_or_path = f"tiny-{spec.arch}-{spec.dtype}"
    torch.manual_seed(0)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # non-trivial norms, as a trained model has
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, DTYPES[spec.dtype]))
    out.mkdir(parents=True)
    model.save_pretrained(out, safe_serialization=True)
    _save_tokenizer(out, params["vocab_size"])


def _build_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(
        model, LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, target_modules=targets)
    )
    torch.manual_seed(1)
    with torch.no_grad():  # a fresh LoRA has B = 0, which would apply nothing
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)


def ensure(specs: list[Spec], say: Say | None = None) -> dict[Spec, Path]:
    """Every artifact of ``specs`` (and what it is made from), built where not cached. vLLM
    exports of one base model share one llm-compressor process per layout set."""
    say = say or (lambda msg: None)
    out: dict[Spec, Path] = {}
    with (
        file_lock(root() / ".build.lock"),
        tempfile.TemporaryDirectory(prefix=".build-", dir=root()) as tmp,
    ):
        work = Path(tmp)
        text = work / "calib.txt"
        text.write_text(TEXT)

        def get(spec: Spec) -> Path:
            if spec in out:
                return out[spec]
            hit = cached(spec)
            if hit is None:
                hit = _build(spec, work, text, get, say)
            out[spec] = hit
            return hit

        _exports([s for s in specs if s.kind == "vllm" and cached(s) is None], work, text, get, say)
        for s in specs:
            get(s)
    return out


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """No transformers progress bars on the caller's stderr while a tiny model is written."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():  # peft's own use of deprecated transformers calls
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _build(spec: Spec, work: Path, text: Path, get: Callable[[Spec], Path], say: Say) -> Path:
    from quantkit.convert import convert

    dest = work / spec.key()
    dest.mkdir()
    if spec.kind == "base":
        say(f"building a tiny {spec.arch} model ({DTYPES[spec.dtype]})")
        with _quiet():
            _build_base(spec, dest / f"tiny-{spec.arch}-{spec.dtype}")
        return _store(spec, dest / f"tiny-{spec.arch}-{spec.dtype}")
    if spec.kind == "adapter":
        base = get(Spec("base", spec.arch, spec.dtype))
        say("building a PEFT LoRA adapter")
        with _quiet():
            _build_adapter(base, dest / "tiny-adapter")
        return _store(spec, dest / "tiny-adapter")
    if spec.kind == "gguf":
        from quantkit.convert.quantized import QuantSettings
        from quantkit.quantize.gguf.types import gguf_type

        base = get(Spec("base", spec.arch, spec.dtype))
        say(f"converting to GGUF {spec.gtype}")
        qs = (
            QuantSettings(calib=text, calib_ctx=64) if gguf_type(spec.gtype or "").imatrix else None
        )
        res = convert(base, [f"gguf:{spec.gtype}"], dest / f"tiny-{spec.gtype}.gguf", quant=qs)
        return _store(spec, res.artifacts[0].path)
    if spec.kind in ("gguf-lora", "vllm-lora"):
        base = get(Spec("base", spec.arch, "f32"))
        adapter = get(Spec("adapter", spec.arch, "f32"))
        say(f"writing the adapter as {spec.kind}")
        res = convert(base, [spec.kind], dest, adapter=adapter)
        return _store(spec, res.artifacts[0].path)
    if spec.kind == "vllm":  # not made by _exports: a target whose group needs its own run
        _exports([spec], work, text, get, say)
        hit = cached(spec)
        assert hit is not None
        return hit
    raise ValueError(f"unknown artifact kind {spec.kind!r}")


def _exports(
    specs: list[Spec], work: Path, text: Path, get: Callable[[Spec], Path], say: Say
) -> None:
    """Build vLLM exports in as few llm-compressor runs as the formats allow: per base model,
    one run for every target (gptq/awq in both layouts when any legacy one is asked; the others
    have no legacy layout, so they run apart then)."""
    from quantkit.quantize.vllm import VllmSettings, export_vllm
    from quantkit.targets import parse_target

    # (arch, dtype, layouts) → target → the specs (layouts) wanted of it
    groups: dict[tuple[str, str, tuple[str, ...]], dict[str, list[Spec]]] = {}
    for s in dict.fromkeys(specs):
        target = s.target or ""
        legacy = any(x.layout == "legacy" for x in specs if (x.arch, x.dtype) == (s.arch, s.dtype))
        both = legacy and parse_target(target).method in ("gptq", "awq")
        layouts = ("compressed-tensors", "legacy") if both else ("compressed-tensors",)
        groups.setdefault((s.arch, s.dtype, layouts), {}).setdefault(target, []).append(s)
    runs: list[tuple[str, str, tuple[str, ...], dict[str, str]]] = []
    for (arch, dtype, layouts), by_target in groups.items():
        # export_vllm takes one target per label (fp8:block with its experts in fp8 or in float
        # share the label "fp8-block"): a second one goes to another run
        batches: list[dict[str, str]] = []  # label → target
        for target in by_target:
            label = parse_target(target).label()
            b = next((b for b in batches if label not in b), None)
            if b is None:
                batches.append(b := {})
            b[label] = target
        runs += [(arch, dtype, layouts, b) for b in batches]
    for arch, dtype, layouts, batch in runs:
        base = get(Spec("base", arch, dtype))
        targets = list(batch.values())
        say(f"llm-compressor: {', '.join(targets)} of the tiny {arch} ({DTYPES[dtype]})")
        s = VllmSettings(layouts=layouts, calib=text, samples=4, seq_len=64)
        # one target in one layout: the output path is the checkpoint folder itself
        folder = Path(tempfile.mkdtemp(prefix="export-", dir=work))
        single = len(targets) == 1 and len(layouts) == 1
        dest = folder / (f"tiny-{arch}-{dtype}-{next(iter(batch))}" if single else "out")
        res = export_vllm(base, targets, dest, s)
        for a in res.artifacts:
            target = batch.get(a.type)
            for spec in groups[(arch, dtype, layouts)].get(target or "", []):
                if spec.layout == a.layout:
                    _store(spec, a.path)
