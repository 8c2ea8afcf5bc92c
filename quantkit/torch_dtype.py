"""Run a torch model in another dtype than its weights are stored in, one module at a time.

transformers keeps a checkpoint's weights as views of the safetensors memory map when it loads
them in their stored dtype (file-backed pages the kernel can drop); any other dtype is a converted
copy of every weight in anonymous memory (32 GB for an 8B model in float32). ``compute_in``
instead leaves the stored weights in place and casts each module's own parameters and buffers
for the duration of its call: the arithmetic is the same as the whole model converted once (every
operation sees the same converted values), and what exists converted at any moment is one
module's weights — the largest tensor, not the model.

An embedding converts only the rows a call looks up (a 128k-token vocabulary at width 4096 is
2 GiB in float32).
"""

from __future__ import annotations

from typing import Any

Handles = list[Any]  # torch RemovableHandle


def compute_in(model: Any, dtype: Any) -> Handles:
    """Hooks that run every module of ``model`` in ``dtype`` (a torch float dtype) while its
    stored weights stay as they are; returns the handles (``remove()`` each to undo)."""
    import torch

    handles: Handles = []
    for module in model.modules():
        own = [
            t
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))
            if t.is_floating_point() and t.dtype != dtype
        ]
        if not own:
            continue
        if isinstance(module, torch.nn.Embedding):
            handles += embedding_rows_in(module, dtype)
        else:
            handles += _cast_in_call(module, dtype)
    return handles


def _cast_in_call(module: Any, dtype: Any) -> Handles:
    saved: list[tuple[Any, Any]] = []

    def pre(mod: Any, _args: tuple[Any, ...]) -> None:
        for t in (*mod.parameters(recurse=False), *mod.buffers(recurse=False)):
            if t.is_floating_point() and t.dtype != dtype:
                saved.append((t, t.data))
                t.data = t.data.to(dtype)

    def post(_mod: Any, _args: tuple[Any, ...], _out: Any) -> None:
        for t, data in saved:
            t.data = data
        saved.clear()

    return [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]


def embedding_rows_in(emb: Any, dtype: Any) -> Handles:
    """Within a call, ``emb`` looks up from a ``dtype`` table of only the rows the call asks
    for; its stored weight is put back after the call."""
    import torch

    state: dict[str, Any] = {}

    def pre(mod: Any, args: tuple[Any, ...]) -> Any:
        ids = args[0]
        rows, inverse = torch.unique(ids, return_inverse=True)
        state["weight"], state["padding_idx"] = mod.weight.data, mod.padding_idx
        mod.weight.data = state["weight"][rows].to(dtype)
        mod.padding_idx = None  # the padding index only matters to gradients
        return (inverse.reshape(ids.shape), *args[1:])

    def post(mod: Any, _args: tuple[Any, ...], _out: Any) -> None:
        mod.weight.data, mod.padding_idx = state.pop("weight"), state.pop("padding_idx")

    return [emb.register_forward_pre_hook(pre), emb.register_forward_hook(post)]
