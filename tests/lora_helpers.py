"""PEFT LoRA builders shared by the tests (tests/test_lora.py, test_export_api.py,
test_run_adapter.py): a random non-zero adapter on a tiny base, and the PEFT model's logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# plain scaling, and rsLoRA with per-module rank and alpha patterns (scale alpha/sqrt(r))
VARIANTS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(
        r=8,
        lora_alpha=16,
        use_rslora=True,
        rank_pattern={"q_proj": 4},
        alpha_pattern={"down_proj": 32},
    ),
}


def make_adapter(base: Path, out: Path, seed: int = 1, **lora) -> Path:
    """A PEFT LoRA on ``base`` with random non-zero B (a fresh LoRA has B = 0), saved to ``out``."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    lora.setdefault("target_modules", LINEAR)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(0, 0.05)
    peft_model.save_pretrained(out)
    return out


def peft_logits(base: Path, adapter: Path, tokens: list[int]) -> np.ndarray:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        base, dtype=torch.float32, attn_implementation="eager"
    )
    model = PeftModel.from_pretrained(model, adapter).eval()
    with torch.no_grad():
        return model(torch.tensor([tokens])).logits[0].float().numpy()
