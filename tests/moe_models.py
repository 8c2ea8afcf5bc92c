"""Tiny random mixture-of-experts models (4 experts, 2 active) shared by the MoE tests: GGUF
conversion (test_convert_moe.py), the MoE importance matrix (test_imatrix_moe.py) and the vLLM
exports (test_vllm_moe.py)."""

from __future__ import annotations

from pathlib import Path

from conftest import TINY, save_bpe_tokenizer

MOE = dict(num_experts_per_tok=2)
# (case, architecture, config overrides)
CASES = [
    ("mixtral", "MixtralForCausalLM", {"num_local_experts": 4, **MOE}),
    (
        "qwen3moe",
        "Qwen3MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 256, "norm_topk_prob": True, "head_dim": 96, **MOE},
    ),
    (
        "qwen2moe",
        "Qwen2MoeForCausalLM",
        {"num_experts": 4, "moe_intermediate_size": 256, "shared_expert_intermediate_size": 512, **MOE},
    ),
]  # fmt: skip
ARCH = {case: (arch, ov) for case, arch, ov in CASES}


def make_tiny_moe(out: Path, arch: str, seed: int = 0, **overrides) -> Path:
    """A random tiny MoE model of ``arch`` saved with a BPE tokenizer (per-expert tensors, as
    transformers writes them)."""
    import torch
    import transformers

    params = {**TINY, **overrides}
    config = getattr(transformers, arch.replace("ForCausalLM", "Config"))(**params)
    config.architectures = [arch]
    torch.manual_seed(seed)
    model = getattr(transformers, arch)(config).eval()
    with torch.no_grad():  # non-trivial norms and biases so a wrong mapping shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith(".bias"):
                p.normal_(0, 0.1)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    save_bpe_tokenizer(out, params["vocab_size"])
    return out


def make_case(out: Path, case: str, **overrides) -> Path:
    """One of CASES by its name ("mixtral", "qwen3moe", "qwen2moe")."""
    arch, ov = ARCH[case]
    return make_tiny_moe(out, arch, **{**ov, **overrides})
