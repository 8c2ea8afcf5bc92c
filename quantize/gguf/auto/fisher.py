"""Fisher weights: how much KLD a unit of squared error in each weight adds, per weight.

To second order, the KLD between the base's next-token distribution and that of a copy whose
Linear weight W carries an error ΔW is ½ E[δzᵀ F_z δz], F_z the Fisher of the logits z. Written
at the Linear's output y = W x, with g = ∂ log p(ŷ)/∂y for a token ŷ drawn from the base's own
distribution (so that E_ŷ[g gᵀ] is that Fisher brought back to y), and keeping the diagonal in
the entries of ΔW (a quantizer's rounding errors are close to independent from weight to weight):

    KLD(ΔW) ≈ ½ Σ_ij F_ij ΔW_ij²,    F_ij = (1 / N) Σ_positions E_ŷ[g_i²] · x_j²

N the scored positions. Unlike the importance matrix (Σ x_j² alone), F weighs each output row by
how much the rest of the network and the loss care about it: a layer whose errors are washed out
downstream, or an output channel nobody reads, weighs little. F is in KLD units already.

The model runs in torch, one decoder layer in memory at a time (its weights read from the
checkpoint, then dropped): the inputs of every layer are kept (tokens × hidden), the gradient is
carried back layer by layer, each layer recomputed with autograd. F is kept only for the rows the
sensitivity pass measures (``rows``), in llama.cpp's row order (the Q/K rotary permutation
applied), so memory is one layer plus the sampled rows, whatever the model's size.

Decoders whose layers run as Llama's do (embedding, rotary, causal layers, final norm, head)
are supported; for any other the pass returns None and the sensitivity falls back to probes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import numpy as np

from quantkit.checkpoint import Checkpoint
from quantkit.progress import Progress

# Families whose transformers decoder is embedding → rotary → layers → norm → head, with no
# scaling of the embedding (Gemma's) or fused projections (Phi-3's qkv_proj).
SUPPORTED = frozenset({"llama", "mistral", "qwen2", "qwen3"})
# Sampled tokens ŷ per position (each one more backward pass): 4 up to FISHER_TOKEN_PARAMS of
# tokens × parameters, fewer above, never fewer than one. On the 135 M embedded default's
# float-like copy, the Fisher error alone ranked 24 measured single-tensor KLDs at Spearman 0.95
# with 1 sample, 0.97 with 4.
FISHER_SAMPLES = 4
FISHER_TOKEN_PARAMS = 1.6e13


def supported(ckpt: Checkpoint | None) -> bool:
    return ckpt is not None and ckpt.config.get("model_type") in SUPPORTED


def n_samples(tokens: int, n_params: int) -> int:
    return max(1, min(FISHER_SAMPLES, int(FISHER_TOKEN_PARAMS // max(1, tokens * n_params))))


def fisher_rows(
    ckpt: Checkpoint,
    chunks: list[list[int]],
    rows: dict[str, np.ndarray],
    *,
    first: int,
    samples: int = FISHER_SAMPLES,
    threads: int | None = None,
    progress: Progress | None = None,
) -> dict[str, np.ndarray]:
    """F (len(rows[name]) × ncols, float64) for every GGUF tensor named in ``rows`` (its row
    indices in the GGUF file), from ``chunks`` scored from position ``first`` on, as
    llama-perplexity and the probes score them."""
    import torch

    from quantkit.convert.archs.base import resolve

    torch.set_num_threads(threads or len(os.sched_getaffinity(0)))
    arch = resolve(ckpt.config)
    runner = _Runner(ckpt, torch.float32)
    acc = {n: np.zeros((len(r), 0)) for n, r in rows.items()}  # sized when first seen
    n_layers = runner.n_layers
    steps = 2 * n_layers + 1
    tick = (lambda i: progress("fisher", i, steps)) if progress else (lambda i: None)
    with torch.no_grad():
        ids = torch.tensor(chunks, dtype=torch.long)
        h = runner.embed(ids)
        pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
        rope = runner.rope(h, pos)
        inputs = []
        for i in range(n_layers):
            inputs.append(h)
            h = runner.layer(i, h, rope, pos)
            tick(i + 1)
    grads = runner.head_grads(h, first, samples)
    n_scored = ids.shape[0] * (ids.shape[1] - 1 - first) * samples
    for i in reversed(range(n_layers)):
        grads = runner.layer_backward(i, inputs[i], rope, pos, grads, _collector(
            arch, i, rows, acc, torch))  # fmt: skip
        tick(2 * n_layers - i)
    tick(steps)
    return {n: 0.5 * a / n_scored for n, a in acc.items() if a.shape[1]}


def _collector(arch: Any, layer: int, rows: dict[str, np.ndarray], acc: dict, torch: Any):
    """For one layer's Linear modules: GGUF name and the HF rows of its sampled GGUF rows; the
    callback adds Σ_positions g_i² x_j² of one backward pass."""

    def names(sub: str, out_features: int) -> tuple[str, np.ndarray] | None:
        hf = f"model.layers.{layer}.{sub}.weight"
        name = arch.gguf_name(hf)
        if name not in rows:
            return None
        perm = arch.transform(hf, np.arange(out_features))  # GGUF row r is HF row perm[r]
        return name, perm[rows[name]]

    def add(name: str, hf_rows: np.ndarray, x: Any, g: Any) -> None:
        x2 = x.reshape(-1, x.shape[-1]).double() ** 2
        g2 = g.reshape(-1, g.shape[-1])[:, torch.as_tensor(hf_rows)].double() ** 2
        part = (g2.T @ x2).numpy()
        acc[name] = part if acc[name].shape[1] == 0 else acc[name] + part

    return names, add


class _Runner:
    """One transformers decoder, run a layer at a time from the checkpoint's tensors."""

    def __init__(self, ckpt: Checkpoint, dtype: Any) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        self.ckpt, self.dtype, self.torch = ckpt, dtype, torch
        cfg = dict(ckpt.config)
        config = AutoConfig.for_model(**cfg)
        config._attn_implementation = "sdpa"  # no mask given: sdpa attends causally
        with torch.device("meta"):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.n_layers = config.num_hidden_layers
        inner = self.model.model
        rope_cls = type(inner.rotary_emb)
        self.rotary = rope_cls(config=config)  # its inverse frequencies computed on the CPU
        self._load(inner.embed_tokens, "model.embed_tokens.")
        self._load(inner.norm, "model.norm.")
        tied = "lm_head.weight" not in ckpt.tensors
        self._load(self.model.lm_head, "model.embed_tokens." if tied else "lm_head.")

    def _load(self, module: Any, prefix: str) -> None:
        torch = self.torch
        state = {}
        for key, p in module.state_dict(keep_vars=True).items():
            if isinstance(p, torch.nn.Parameter) or prefix + key in self.ckpt.tensors:
                state[key] = torch.from_numpy(np.array(self.ckpt.float32(prefix + key))).to(
                    self.dtype
                )
                self.ckpt.release(prefix + key)
        module.to_empty(device="cpu")
        module.load_state_dict(state, strict=False, assign=True)
        for p in module.parameters():
            p.requires_grad_(False)

    def _unload(self, module: Any) -> None:
        module.to("meta")

    def embed(self, ids: Any) -> Any:
        return self.model.model.embed_tokens(ids).to(self.dtype)

    def rope(self, h: Any, pos: Any) -> Any:
        return self.rotary(h, position_ids=pos)

    def _call(self, i: int, h: Any, rope: Any, pos: Any) -> Any:
        out = self.model.model.layers[i](h, attention_mask=None, position_ids=pos,
                                         position_embeddings=rope)  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    def layer(self, i: int, h: Any, rope: Any, pos: Any) -> Any:
        mod = self.model.model.layers[i]
        self._load(mod, f"model.layers.{i}.")
        try:
            return self._call(i, h, rope, pos)
        finally:
            self._unload(mod)

    def head_grads(self, h: Any, first: int, samples: int) -> list[Any]:
        """∂ Σ log p(ŷ)/∂h at the last layer's output, one per sample of ŷ ~ p."""
        torch = self.torch
        gen = torch.Generator().manual_seed(0)
        h = h.detach().requires_grad_(True)
        with torch.enable_grad():
            z = self.model.lm_head(self.model.model.norm(h))[:, first:-1].double()
            lp = torch.log_softmax(z, dim=-1)
            p = lp.detach().exp().reshape(-1, lp.shape[-1])
            out = []
            for s in range(samples):
                y = torch.multinomial(p, 1, generator=gen).reshape(lp.shape[:-1] + (1,))
                loss = lp.gather(-1, y).sum()
                (g,) = torch.autograd.grad(loss, h, retain_graph=s < samples - 1)
                out.append(g)
        return out

    def layer_backward(
        self, i: int, x: Any, rope: Any, pos: Any, grads: list[Any], collect: tuple
    ) -> list[Any]:
        """Recompute layer ``i`` with autograd and carry each sample's gradient through it,
        handing every Linear's input and output gradient to ``collect``."""
        torch = self.torch
        names, add = collect
        mod = self.model.model.layers[i]
        self._load(mod, f"model.layers.{i}.")
        inputs: dict[str, Any] = {}
        hooks = []
        for sub, lin in mod.named_modules():
            if isinstance(lin, torch.nn.Linear):
                hit = names(sub, lin.out_features)
                if hit is None:
                    continue
                name, hf_rows = hit

                def fwd(m: Any, a: tuple, y: Any, name: str = name, hf_rows: np.ndarray = hf_rows):
                    inputs[name] = a[0].detach()
                    y.register_hook(_grad_hook(add, name, hf_rows, inputs))

                hooks.append(lin.register_forward_hook(fwd))
        try:
            x = x.detach().requires_grad_(True)
            with torch.enable_grad():
                y = self._call(i, x, rope, pos)
                out = []
                for s, g in enumerate(grads):
                    (gx,) = torch.autograd.grad(
                        y, x, grad_outputs=g, retain_graph=s < len(grads) - 1
                    )
                    out.append(gx)
        finally:
            for hk in hooks:
                hk.remove()
            self._unload(mod)
        return out


def _grad_hook(add: Callable, name: str, hf_rows: np.ndarray, inputs: dict) -> Callable:
    def hook(g: Any) -> None:
        add(name, hf_rows, inputs[name], g.detach())

    return hook
