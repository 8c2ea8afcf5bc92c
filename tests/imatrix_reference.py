"""The importance matrix collected with the whole model loaded in float32 and run chunk by
chunk: the straightforward way, kept as the reference the layer-by-layer collector
(quantize/gguf/imatrix.py) must reproduce. Only for tests: it needs 4 bytes per parameter."""

from __future__ import annotations

from pathlib import Path

from quantkit.quantize.gguf.imatrix import (
    Imatrix,
    _prepare,
    attach_hooks,
    finish_imatrix,
    text_dataset_name,
)


def collect_whole_model(model_dir: Path, text: str, *, ctx: int, chunks: int | None) -> Imatrix:
    import torch
    from transformers import AutoModelForCausalLM

    arch, plan, todo = _prepare(Path(model_dir), text, ctx, chunks)
    model = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", use_safetensors=True
    ).eval()
    accs, square_sums, handles = attach_hooks(model, arch, plan)
    body = getattr(model, model.base_model_prefix, model)
    try:
        with torch.no_grad():
            for chunk in todo:
                body(input_ids=torch.tensor([chunk]), use_cache=False)
                square_sums.clear()
    finally:
        for h in handles:
            h.remove()
    return finish_imatrix(Path(model_dir), accs, len(todo), text_dataset_name(text), ctx)
