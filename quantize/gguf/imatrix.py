"""Importance matrix: collected in torch from calibration text, stored as llama.cpp stores it.

The statistic is llama-imatrix's (llama.cpp ``tools/imatrix/imatrix.cpp``,
``IMatrixCollector::collect_imatrix``): for every matrix multiplication whose weight is named
``blk.*`` and whose activation (``src1``) is F32 with at least 16 token rows, each input column j
of that weight gets Σ x_j² over the tokens, and the weight's entry counts the tokens. We hook the
input of every ``nn.Linear`` that becomes such a weight, so the numbers are those llama.cpp would
compute on the converted GGUF:

- ``output.weight`` and ``token_embd.weight`` are never collected (llama-imatrix skips names not
  starting with ``blk.`` unless ``--process-output``; the embedding is a ``get_rows``, not a
  matmul). The quantizer just logs "did not find weights" for them.
- The Q/K rotary permutation (``Architecture.transform``) reorders *output* rows of attn_q/attn_k;
  a weight's imatrix is indexed by its *input* column (``ne[0]``), so it is unaffected.
- Chunking is llama-imatrix's (``compute_imatrix``): the text is tokenized once (BOS in front when
  the vocabulary adds one), chunk i is tokens [i·ctx, (i+1)·ctx) with its first token replaced by
  BOS, each chunk is evaluated from an empty cache, every position is an output (so the last
  layer sees every token). Counts are per token, so a chunk adds ctx to every dense entry.

Data layout (the GGUF imatrix format, ``save_imatrix`` in imatrix.cpp and ``common_imatrix_load``
in ``common/imatrix-loader.cpp``): per weight ``name`` the raw sums ``name.in_sum2`` (F32,
ne = [n_cols, n_mats]) and the token counts ``name.counts`` (F32, ne = [1, n_mats]); n_mats is 1
for a dense weight and n_expert for a 3-D MoE expert tensor (one row of sums and one count per
expert), which is why ``Imatrix.entries`` keeps sums flat (n_mats·n_cols) next to n_mats counts.
The quantizer gets the per-column mean sum/count (``tools/quantize/quantize.cpp``
``load_imatrix``), 1.0 where a matrix saw no token.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantkit.errors import CheckpointError, InputError, UnsupportedArchitectureError
from quantkit.progress import Progress
from quantkit.targets import IMATRIX_CTX
from quantkit.torch_dtype import embedding_rows_in
from quantkit.validate.metrics import make_chunks

# llama.cpp constants (common/imatrix-loader.h, ggml/include/ggml.h, gguf.h)
KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
KEY_TYPE = "general.type"
SUFFIX_SUMS = ".in_sum2"
SUFFIX_COUNTS = ".counts"
MIN_TOKENS = 16  # llama-imatrix ignores matmuls over fewer token rows ("small batches")
GGML_MAX_NAME = 64  # tensor names must be shorter (gguf_init_from_file rejects longer)
GGUF_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT
GGUF_VERSION = 3
GGML_TYPE_F32 = 0
_VT_UINT32, _VT_STRING, _VT_ARRAY = 4, 8, 9  # enum gguf_type


@dataclass
class Imatrix:
    """Per-weight activation statistics, keyed by GGUF tensor name (``blk.0.attn_q.weight``).

    ``entries[name] = (sums, counts)``: ``sums`` float32 of n_mats × n_cols (flat, matrix-major),
    Σ x² per input column; ``counts`` int64 of n_mats, the tokens each matrix saw.
    ``chunks``: chunks evaluated; ``chunk_size``: tokens per chunk (0 when unknown, as in the
    legacy format); ``dataset``: the calibration file name or ``sha256:<hex>`` of its text.
    """

    entries: dict[str, tuple[np.ndarray, np.ndarray]]
    chunks: int
    dataset: str
    chunk_size: int = 0

    def n_mats(self, name: str) -> int:
        return len(self.entries[name][1])

    def n_cols(self, name: str) -> int:
        sums, counts = self.entries[name]
        return len(sums) // len(counts)

    def expert_coverage(self) -> dict[str, list[int]]:
        """Tokens each expert saw, per 3-D expert tensor (n_mats > 1), in expert order."""
        return {
            name: [int(c) for c in counts]
            for name, (_, counts) in sorted(self.entries.items())
            if len(counts) > 1
        }

    def unrouted(self) -> dict[str, list[int]]:
        """Experts calibration never routed a token to, per expert tensor (only those with any).

        They stay in the matrix with a count of 0, as llama-imatrix saves partial data; the
        quantizer then gives their columns uniform importance (1.0, see ``to_quantizer``),
        i.e. those experts are quantized as if there were no importance matrix."""
        return {
            name: [i for i, c in enumerate(counts) if c == 0]
            for name, counts in self.expert_coverage().items()
            if 0 in counts
        }

    def to_quantizer(self) -> dict[str, np.ndarray]:
        """What ``llama_model_imatrix_data.data`` takes: per column sum/count, matrix by matrix.

        As quantize.cpp ``load_imatrix`` (GGUF path): ``sums[j·n_cols + i] / (float) counts[j]``
        in float32, and 1.0 for every column of a matrix whose count is 0 (an unused expert).
        """
        out: dict[str, np.ndarray] = {}
        for name, (sums, counts) in self.entries.items():
            _check_entry(name, sums, counts)
            s = np.asarray(sums, dtype=np.float32).reshape(len(counts), -1)
            c = np.asarray(counts).astype(np.float32)[:, None]
            mean = np.where(c > 0, s / np.where(c > 0, c, np.float32(1)), np.float32(1))
            out[name] = np.ascontiguousarray(mean.reshape(-1), dtype=np.float32)
        return out


def _check_entry(name: str, sums: np.ndarray, counts: np.ndarray) -> None:
    if sums.ndim != 1 or counts.ndim != 1 or len(counts) == 0 or len(sums) == 0:
        raise InputError(f"imatrix entry {name!r}: sums and counts must be non-empty 1-D arrays")
    if len(sums) % len(counts):
        raise InputError(
            f"imatrix entry {name!r}: {len(sums)} sums do not split into {len(counts)} matrices"
        )


# -- chunking ------------------------------------------------------------------------------------


def chunk_tokens(
    tokens: list[int], ctx: int, chunks: int | None, bos: int | None
) -> list[list[int]]:
    """llama-imatrix's chunks: ``n = min(chunks, len(tokens) // ctx)`` windows of ``ctx`` tokens,
    the first token of each replaced by ``bos`` when the vocabulary adds one. ``tokens`` must
    already start with BOS in that case (llama.cpp tokenizes with ``add_special=true``). This is
    llama-perplexity's chunking too, so the one implementation serves both."""
    return make_chunks(tokens, ctx, chunks, bos)


def bos_added(tokenizer: Any) -> int | None:
    """The BOS id when the tokenizer puts one in front of a text, else None.

    quantkit's converter writes ``tokenizer.ggml.add_bos_token`` from the same behaviour
    (convert/tokenizer.py), so this is also what llama.cpp does with the converted file.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    if with_special[:1] == [bos] and plain[:1] != [bos]:
        return int(bos)
    return None


# -- collection ----------------------------------------------------------------------------------


class _Accumulator:
    """Σ x² per input column and token counts for one GGUF weight (n_mats matrices)."""

    def __init__(self, n_cols: int, n_mats: int = 1) -> None:
        import torch

        self.sums = torch.zeros(n_mats, n_cols, dtype=torch.float64)
        self.counts = np.zeros(n_mats, dtype=np.int64)

    def add(self, sq: Any, n_rows: int, mat: int = 0) -> None:
        self.sums[mat] += sq
        self.counts[mat] += n_rows

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        return self.sums.numpy().astype(np.float32).reshape(-1), self.counts.copy()


class _SquareSums:
    """Σ x² over the token rows of an activation, computed once when several weights read the
    same tensor in a row (attn_q/k/v, ffn_gate/up): the hooks see the same tensor object, and
    its version counter tells an in-place change apart."""

    def __init__(self) -> None:
        import torch

        self._f64 = torch.float64
        self._key: tuple[Any, int] | None = None
        self._value: tuple[Any, int] | None = None

    def __call__(self, x: Any) -> tuple[Any, int]:
        key = (x, x._version)
        if self._key is None or self._key[0] is not x or self._key[1] != key[1]:
            rows = x.reshape(-1, x.shape[-1]).float()
            self._key = key
            self._value = ((rows * rows).sum(0, dtype=self._f64), rows.shape[0])
        assert self._value is not None
        return self._value

    def clear(self) -> None:
        self._key = self._value = None


def text_dataset_name(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def collect_imatrix(
    model_dir: Path,
    text: str,
    *,
    ctx: int = IMATRIX_CTX,
    chunks: int | None = None,
    threads: int | None = None,
    progress: Progress | None = None,
    dataset: str | None = None,
) -> Imatrix:
    """Run the HF model in torch (CPU, float32) over ``text`` and collect llama-imatrix's statistic.

    ``chunks``: at most this many chunks of ``ctx`` tokens (None: all full chunks of the text).
    ``dataset``: the name recorded in the file (default ``sha256:`` of the text).
    ``progress(stage, done, total)`` is called as ("imatrix layers", layers done, layers in all).
    Unlike llama-imatrix, one chunk of text is enough (it asks for two, for its perplexity), and
    every token counts: llama-imatrix would skip a trailing micro-batch under 16 tokens when
    ctx > n_ubatch (512) and ctx % 512 < 16, which this does not reproduce.

    Memory is bounded by one decoder layer, not the model (the way llm-compressor's sequential
    pipeline calibrates): the weights stay in the checkpoint's own dtype, backed by the
    safetensors memory map (file pages, not anonymous memory), and one decoder layer at a time
    is widened to float32, run over every chunk's hidden states and dropped again. The hidden
    states of all chunks are carried from layer to layer (chunks × ctx × n_embd float32). The
    embedding widens only the rows a chunk looks up; the output projection never runs
    (llama-imatrix does not collect it). The arithmetic is the float32 model's, so the numbers
    are those of loading the whole model in float32 (tests/imatrix_reference.py keeps that path).

    MoE: every expert tensor (``blk.N.ffn_{gate,up,down}_exps``) gets one row of sums and one
    count per expert, from the tokens the router sent to that expert, as llama-imatrix counts a
    ``MUL_MAT_ID`` (imatrix.cpp: ``e.counts[ex]++`` per routed row). The router
    (``ffn_gate_inp``) is an ordinary matmul over every token.
    """
    import torch

    from quantkit import memory
    from quantkit.checkpoint import Checkpoint

    model_dir = Path(model_dir)
    arch, plan, todo = _prepare(model_dir, text, ctx, chunks)
    with Checkpoint.open(model_dir) as ckpt:
        shape = memory.Shape.of(ckpt)
    memory.check(memory.imatrix_need(shape, ctx=ctx, chunks=len(todo)))  # before any weight
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    handles: list[Any] = []
    try:
        model = _load_file_backed(model_dir)
        accs, square_sums, handles = attach_hooks(model, arch, plan)
        body = getattr(model, model.base_model_prefix, model)
        layers = _decoder_layers(body, arch.h.n_layer)
        handles += _float32_outside_layers(body, layers)
        # no_grad, not inference_mode: inference tensors have no version counter (_SquareSums)
        with torch.no_grad():
            hidden, calls = _layer_inputs(body, layers, todo)
            total = len(layers)
            if progress:
                progress("imatrix layers", 0, total)
            for i, layer in enumerate(layers):
                with _float32(layer):
                    for c in range(len(todo)):
                        args, kwargs = calls[i][c]
                        out = layer(hidden[c], *args, **kwargs)
                        hidden[c] = out[0] if isinstance(out, tuple) else out
                        square_sums.clear()
                calls[i] = []  # this layer's masks and positions are no longer needed
                if progress:
                    progress("imatrix layers", i + 1, total)
    finally:
        for h in handles:
            h.remove()
        torch.set_num_threads(saved_threads)
    return finish_imatrix(model_dir, accs, len(todo), dataset or text_dataset_name(text), ctx)


def _prepare(
    model_dir: Path, text: str, ctx: int, chunks: int | None
) -> tuple[Any, list[Any], list[list[int]]]:
    """Checks before any weight is touched (safetensors only, known architecture, a usable
    context), then the text as llama-imatrix chunks it: (architecture, GGUF plan, chunks)."""
    from transformers import AutoTokenizer

    from quantkit.checkpoint import Checkpoint
    from quantkit.convert.archs import resolve

    if ctx < MIN_TOKENS:
        raise InputError(
            f"imatrix context of {ctx} tokens is too small",
            f"llama.cpp ignores batches under {MIN_TOKENS} tokens; use ctx >= {MIN_TOKENS}",
        )
    with Checkpoint.open(model_dir) as ckpt:
        arch = resolve(ckpt.config, ckpt.path / "config.json")
        plan = arch.plan({n: t.shape for n, t in ckpt.tensors.items()})
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    bos = bos_added(tok)
    # split_special_tokens: text that looks like a special token is plain text, as llama-imatrix
    # tokenizes (parse_special is off unless asked for)
    ids = tok(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]
    tokens = ([bos] if bos is not None else []) + list(ids)
    todo = chunk_tokens(tokens, ctx, chunks, bos)
    if not todo:
        raise InputError(
            f"the calibration text is {len(tokens)} tokens, less than one chunk of {ctx}",
            "give a longer text or a smaller context",
        )
    return arch, plan, todo


def _load_file_backed(model_dir: Path) -> Any:
    """The model in its checkpoint's own float dtype: transformers then keeps each weight a view
    of the safetensors memory map (file pages the kernel can drop, not anonymous memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from quantkit.checkpoint import Checkpoint

    with Checkpoint.open(model_dir) as ckpt:
        source = ckpt.source_dtype
    dtype = {"F16": torch.float16, "BF16": torch.bfloat16}.get(source, torch.float32)
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        dtype=dtype,
        attn_implementation="eager",
        trust_remote_code=False,
        use_safetensors=True,
    ).eval()


def attach_hooks(
    model: Any, arch: Any, plan: list[Any]
) -> tuple[dict[str, _Accumulator], _SquareSums, list[Any]]:
    """One accumulator per GGUF ``blk.*`` weight, fed by a hook on the module applying it:
    (accumulators by GGUF name, the shared Σx² cache to clear between calls, hook handles)."""
    import torch

    expected = arch.expected()
    accs: dict[str, _Accumulator] = {}
    square_sums = _SquareSums()
    handles: list[Any] = []
    to_checkpoint = getattr(arch, "checkpoint_name", lambda n: n)
    for mod_name, module in model.named_modules():
        # nn.Linear, and modules applying their own 2-D weight as one (MoE routers)
        weight = getattr(module, "weight", None)
        ckpt_name = to_checkpoint(f"{mod_name}.weight")
        if (
            ckpt_name not in expected
            or not isinstance(weight, torch.nn.Parameter)
            or weight.dim() != 2
            or isinstance(module, torch.nn.Embedding)
        ):
            continue
        gguf_name = arch.gguf_name(ckpt_name)
        if not gguf_name.startswith("blk."):
            continue  # output.weight: llama-imatrix collects it only with --process-output
        acc = accs[gguf_name] = _Accumulator(int(weight.shape[1]))

        def hook(_mod: Any, args: tuple[Any, ...], acc: _Accumulator = acc) -> None:
            acc.add(*square_sums(args[0].detach()))

        handles.append(module.register_forward_pre_hook(hook))
    handles += _hook_experts(model, arch, accs)
    # every 2-D blk.* weight is a matmul llama.cpp collects: refuse to leave one out (a
    # model whose projections are neither nn.Linear nor known expert modules)
    wanted = {pt.name for pt in plan if len(pt.shape) >= 2}
    missed = sorted(n for n in wanted if n.startswith("blk.") and n not in accs)
    if missed or not accs:
        for h in handles:
            h.remove()
        raise UnsupportedArchitectureError(
            f"imatrix collection has no hook for {', '.join(missed[:3]) or 'any weight'}"
            + (f" (+{len(missed) - 3} more)" if len(missed) > 3 else ""),
            "quantize this model without an imatrix",
        )
    return accs, square_sums, handles


def finish_imatrix(
    model_dir: Path, accs: dict[str, _Accumulator], chunks: int, dataset: str, ctx: int
) -> Imatrix:
    """The accumulated sums as an ``Imatrix``, refusing weights no token reached and
    non-finite sums."""
    entries = {}
    for name in sorted(accs):
        sums, counts = accs[name].result()
        if len(counts) > 1 and counts.any():
            pass  # an expert tensor: experts never routed to keep count 0 (see Imatrix.unrouted)
        elif not counts.all():
            raise UnsupportedArchitectureError(
                f"imatrix collection: {name} was never used by the torch model",
                "quantize this model without an imatrix",
            )
        if not np.isfinite(sums).all():
            raise CheckpointError(
                f"{model_dir}: non-finite activations at the input of {name}",
                "the model overflows on this text in float32; check the checkpoint",
            )
        entries[name] = (sums, counts)
    return Imatrix(entries, chunks, dataset, ctx)


def _decoder_layers(body: Any, n_layer: int) -> Any:
    """The decoder's stack of layers: the ``nn.ModuleList`` of ``n_layer`` blocks that holds
    most of the body's parameters (``model.layers`` in every family quantkit converts)."""
    import torch

    best, best_size = None, -1
    for module in body.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layer:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise UnsupportedArchitectureError(
            f"imatrix collection found no stack of {n_layer} decoder layers in the torch model",
            "quantize this model without an imatrix",
        )
    return best


class _float32:
    """Within the block, a module's float weights and buffers are float32 copies; on exit
    the originals (views of the memory map) are put back and the copies freed."""

    def __init__(self, module: Any) -> None:
        self.module = module
        self.saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> None:
        import torch

        for t in (*self.module.parameters(), *self.module.buffers()):
            if t.is_floating_point() and t.dtype != torch.float32:
                self.saved.append((t, t.data))
                t.data = t.data.float()

    def __exit__(self, *exc: object) -> None:
        for t, data in self.saved:
            t.data = data
        self.saved.clear()


def _float32_outside_layers(body: Any, layers: Any) -> list[Any]:
    """Float32 for what the body runs outside its layers: small weights (final norm) are
    widened for good; an embedding widens only the rows a chunk looks up, inside its call
    (a 128k × 4096 vocabulary would be 2 GiB in float32). Returns the hook handles."""
    import torch

    in_layers = {id(p) for p in layers.parameters()} | {id(b) for b in layers.buffers()}
    embeddings = [m for m in body.modules() if isinstance(m, torch.nn.Embedding)]
    in_embeddings = {id(m.weight) for m in embeddings}
    for t in (*body.parameters(), *body.buffers()):
        if id(t) in in_layers or id(t) in in_embeddings:
            continue
        if t.is_floating_point() and t.dtype != torch.float32:
            t.data = t.data.float()
    handles = []
    for emb in embeddings:
        if any(p is emb.weight for p in layers.parameters()):
            continue
        handles += embedding_rows_in(emb, torch.float32)
    return handles


class _Recorded(Exception):
    pass


def _layer_inputs(
    body: Any, layers: Any, todo: list[list[int]]
) -> tuple[list[Any], list[list[tuple[tuple[Any, ...], dict[str, Any]]]]]:
    """Run the body over each chunk with every layer replaced by a recorder that passes its
    input through: the embedding output of each chunk (the first layer's input) and, per layer
    and chunk, the other arguments the body hands that layer (mask, rotary cos/sin, positions —
    they do not depend on the hidden states, and differ by layer where the body says so,
    e.g. sliding-window layers)."""
    import torch

    hidden: list[Any] = []
    calls: list[list[tuple[tuple[Any, ...], dict[str, Any]]]] = [[] for _ in layers]
    originals = [layer.forward for layer in layers]

    def recorder(i: int) -> Any:
        def forward(*args: Any, **kwargs: Any) -> Any:
            if args:
                h, rest = args[0], args[1:]
            else:
                h, rest = kwargs.pop("hidden_states"), ()
            if i == 0:
                hidden.append(h)
            elif h is not hidden[-1]:
                raise _Recorded  # the body changes hidden states between layers itself
            calls[i].append((rest, kwargs))
            return h

        return forward

    try:
        for i, layer in enumerate(layers):
            layer.forward = recorder(i)
        for chunk in todo:
            body(input_ids=torch.tensor([chunk]), use_cache=False)
    except _Recorded:
        raise UnsupportedArchitectureError(
            "imatrix collection: this model's decoder changes the hidden states between its "
            "layers, so they cannot be run one at a time",
            "quantize this model without an imatrix",
        ) from None
    finally:
        for layer, fwd in zip(layers, originals, strict=True):
            if "forward" in vars(layer):
                del layer.forward
            assert layer.forward == fwd
    return hidden, calls


def _hook_experts(model: Any, arch: Any, accs: dict[str, _Accumulator]) -> list[Any]:
    """Hooks on each MoE layer's fused experts module (transformers 5: ``gate_up_proj``
    [E, 2·ff, n_embd], ``down_proj`` [E, n_embd, ff], called as ``experts(x, top_k_index,
    top_k_weights)``): per expert, Σ x² of the tokens routed to it for gate/up, and Σ a² of its
    activation ``act(x·Wg) * (x·Wu)`` for down (the input of llama.cpp's ffn_down_exps; routing
    weights are applied after it, in llama.cpp as in transformers)."""
    import torch

    specs = getattr(arch, "expert_tensors", ())
    if not specs:
        return []
    modules = dict(model.named_modules())
    handles = []
    n_expert = arch.h.n_expert
    for bid in range(arch.h.n_layer):
        by_role = {spec.role: spec for spec in specs}
        module = modules.get(arch.torch_experts_module(bid))
        if (
            module is None
            or not hasattr(module, "gate_up_proj")
            or not hasattr(module, "down_proj")
        ):
            continue  # reported as missed by the caller
        slots = {}
        for role, spec in by_role.items():
            name = arch.gguf_name(spec.merged.format(bid=bid))
            cols = arch.h.n_ff_exp if role == "down" else arch.h.n_embd
            slots[role] = accs[name] = _Accumulator(cols, n_expert)

        def hook(mod: Any, args: tuple[Any, ...], kwargs: dict[str, Any], slots=slots) -> None:
            names = ("hidden_states", "top_k_index", "top_k_weights")
            got = dict(zip(names, args, strict=False)) | {
                k: kwargs[k] for k in names if k in kwargs
            }
            x = got["hidden_states"].detach().reshape(-1, mod.gate_up_proj.shape[-1]).float()
            idx = got["top_k_index"].detach().reshape(x.shape[0], -1)
            for e in range(n_expert):
                rows = (idx == e).any(-1).nonzero().squeeze(-1)
                if rows.numel() == 0:
                    continue
                xe = x[rows]
                sq = (xe * xe).sum(0, dtype=torch.float64)
                slots["gate"].add(sq, rows.numel(), e)
                slots["up"].add(sq, rows.numel(), e)
                gate, up = torch.nn.functional.linear(xe, mod.gate_up_proj[e].float()).chunk(2, -1)
                a = mod.act_fn(gate) * up
                slots["down"].add((a * a).sum(0, dtype=torch.float64), rows.numel(), e)

        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
    return handles


# -- GGUF imatrix file ---------------------------------------------------------------------------


def _gguf_str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


def _pad(n: int) -> int:
    return -(-n // GGUF_ALIGNMENT) * GGUF_ALIGNMENT


def _n_dims(ne: tuple[int, ...]) -> int:
    # ggml_n_dims: trailing dimensions of 1 are not written
    for i in range(len(ne) - 1, 0, -1):
        if ne[i] > 1:
            return i + 1
    return 1


def imatrix_gguf_bytes(im: Imatrix) -> bytes:
    """The file imatrix.cpp ``save_imatrix`` writes (``gguf_write_to_file``) for these data."""
    for key, v in (("chunk count", im.chunks), ("chunk size", im.chunk_size)):
        if not 0 <= int(v) < 2**32:
            raise InputError(f"imatrix {key} {v} does not fit the file's uint32")
    datasets = [im.dataset] if im.dataset else []
    kv = _gguf_str(KEY_TYPE) + struct.pack("<I", _VT_STRING) + _gguf_str("imatrix")
    kv += _gguf_str(KEY_DATASETS) + struct.pack("<IIQ", _VT_ARRAY, _VT_STRING, len(datasets))
    kv += b"".join(_gguf_str(d) for d in datasets)
    kv += _gguf_str(KEY_CHUNK_COUNT) + struct.pack("<II", _VT_UINT32, int(im.chunks))
    kv += _gguf_str(KEY_CHUNK_SIZE) + struct.pack("<II", _VT_UINT32, int(im.chunk_size))

    infos, blobs, offset = b"", [], 0
    for name in sorted(im.entries):  # deterministic order, as imatrix.cpp sorts
        sums, counts = im.entries[name]
        _check_entry(name, sums, counts)
        n_mats = len(counts)
        n_cols = len(sums) // n_mats
        if not np.isfinite(sums).all():
            raise InputError(f"imatrix entry {name!r} has non-finite sums")
        if (np.asarray(counts) < 0).any():
            raise InputError(f"imatrix entry {name!r} has negative counts")
        for tname, ne, data in (
            (name + SUFFIX_SUMS, (n_cols, n_mats), np.asarray(sums, dtype="<f4")),
            (name + SUFFIX_COUNTS, (1, n_mats), np.asarray(counts).astype("<f4")),
        ):
            if len(tname.encode("utf-8")) >= GGML_MAX_NAME:
                raise InputError(
                    f"imatrix tensor name {tname!r} is too long for GGUF ({GGML_MAX_NAME - 1} bytes at most)"
                )
            nd = _n_dims(ne)
            infos += _gguf_str(tname) + struct.pack(
                f"<I{nd}qIQ", nd, *ne[:nd], GGML_TYPE_F32, offset
            )
            raw = data.tobytes()
            blobs.append(raw + b"\0" * (_pad(len(raw)) - len(raw)))
            offset += _pad(len(raw))
    n_tensors = 2 * len(im.entries)
    head = b"GGUF" + struct.pack("<IQQ", GGUF_VERSION, n_tensors, 4) + kv + infos
    head += b"\0" * (_pad(len(head)) - len(head))
    return head + b"".join(blobs)


def save_imatrix(im: Imatrix, path: Path) -> None:
    """Write ``im`` in llama.cpp's GGUF imatrix format, to a temporary name renamed when complete."""
    from quantkit.atomic import atomic_output

    data = imatrix_gguf_bytes(im)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())


def load_imatrix(path: Path) -> Imatrix:
    """Read an imatrix file: llama.cpp's GGUF format, or the legacy ``.dat`` format."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except FileNotFoundError:
        raise InputError(f"{path}: no such imatrix file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory, not an imatrix file") from None
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    if magic == b"GGUF":
        return _load_gguf(path)
    return _load_legacy(path)


def _load_gguf(path: Path) -> Imatrix:
    from quantkit.quantize.gguf.reader import read_gguf

    info = read_gguf(path, keep_arrays=(KEY_DATASETS,))
    bad = f"{path}: not a usable imatrix"
    if not info.tensors:
        raise InputError(f"{bad}: no data")
    # quantize.cpp refuses a GGUF imatrix without all three keys ("missing imatrix metadata")
    missing = [
        k
        for k in (KEY_DATASETS, KEY_CHUNK_COUNT, KEY_CHUNK_SIZE)
        if k not in info.metadata and k not in info.arrays
    ]
    if missing:
        raise InputError(f"{bad}: missing metadata {', '.join(missing)}")
    if KEY_DATASETS in info.arrays and info.arrays[KEY_DATASETS][0] != "STRING":
        raise InputError(f"{bad}: {KEY_DATASETS} is not an array of strings")
    datasets = info.metadata.get(KEY_DATASETS)
    if not isinstance(datasets, list):
        raise InputError(f"{bad}: {KEY_DATASETS} is not an array of strings")
    nums = {}
    for key in (KEY_CHUNK_COUNT, KEY_CHUNK_SIZE):
        v = info.metadata.get(key)
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 2**32:
            raise InputError(f"{bad}: {key} is not a uint32")
        nums[key] = v

    pairs: dict[str, list[Any]] = {}
    for t in info.tensors:
        for suffix, slot in ((SUFFIX_SUMS, 0), (SUFFIX_COUNTS, 1)):
            if t.name.endswith(suffix) and len(t.name) > len(suffix):
                pairs.setdefault(t.name[: -len(suffix)], [None, None])[slot] = t
    if not pairs:
        raise InputError(f"{bad}: no {SUFFIX_SUMS}/{SUFFIX_COUNTS} tensors")
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        for name in sorted(pairs):
            sums_t, counts_t = pairs[name]
            if sums_t is None or counts_t is None:
                raise InputError(f"{bad}: mismatched sums and counts for {name}")
            if sums_t.type != "F32" or counts_t.type != "F32":
                raise InputError(f"{bad}: sums and counts for {name} must be F32")
            nval, ncounts = sums_t.n_elements, counts_t.n_elements
            if ncounts == 0 or nval == 0 or nval % ncounts:
                raise InputError(
                    f"{bad}: {name} has {nval} sums for {ncounts} counts (not a whole number per matrix)"
                )
            sums = np.frombuffer(buf, "<f4", nval, sums_t.offset).astype(np.float32)
            raw_counts = np.frombuffer(buf, "<f4", ncounts, counts_t.offset).astype(np.float64)
            if not np.isfinite(sums).all():
                raise InputError(f"{bad}: non-finite sums for {name}")
            if (
                not np.isfinite(raw_counts).all()
                or (raw_counts < 0).any()
                or (raw_counts >= 2**62).any()
            ):
                raise InputError(f"{bad}: invalid counts for {name}")
            # std::lround: halves away from zero (counts are non-negative here)
            counts = np.floor(raw_counts + 0.5).astype(np.int64)
            entries[name] = (sums, counts)
    return Imatrix(
        entries,
        nums[KEY_CHUNK_COUNT],
        str(datasets[0]) if datasets else "",
        nums[KEY_CHUNK_SIZE],
    )


def _load_legacy(path: Path) -> Imatrix:
    """The pre-GGUF ``.dat`` format (imatrix.cpp ``save_imatrix_legacy``): per entry the mean
    times ``ncall`` and ``ncall``; kept as sums = stored values, counts = [ncall], so the
    quantizer gets stored/ncall exactly as quantize.cpp computes it (stored values as they are
    when ncall is 0)."""
    bad = f"{path}: not an imatrix file (neither GGUF nor the legacy format)"
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file, not an imatrix")
    if size > 2**31:
        raise InputError(f"{bad}: too large for the legacy format")
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str) -> Any:
        nonlocal pos
        size = struct.calcsize(fmt)
        if len(data) - pos < size:
            raise InputError(f"{bad}: truncated at {what}")
        v = struct.unpack_from(fmt, data, pos)
        pos += size
        return v[0] if len(v) == 1 else v

    n_entries = take("<i", "the entry count")
    # smallest entry: name length (4) + 1 byte of name + ncall (4) + nval (4) + one float (4)
    if n_entries < 1 or n_entries > (len(data) - pos) // 17:
        raise InputError(f"{bad}: entry count {n_entries} does not fit the file")
    entries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    max_ncall = 0
    for i in range(n_entries):
        length = take("<i", f"entry {i + 1}'s name length")
        if not 0 < length <= len(data) - pos:
            raise InputError(f"{bad}: entry {i + 1} has a name of {length} bytes")
        raw = data[pos : pos + length].split(b"\0", 1)[0]
        pos += length
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"{bad}: entry {i + 1} has a name that is not UTF-8") from None
        ncall, nval = take("<ii", f"entry {name!r}'s sizes")
        if nval < 1 or nval > (len(data) - pos) // 4:
            raise InputError(f"{bad}: entry {name!r} claims {nval} values")
        sums = np.frombuffer(data, "<f4", nval, pos).astype(np.float32)
        pos += 4 * nval
        if not np.isfinite(sums).all():
            raise InputError(f"{bad}: non-finite values for {name}")
        entries[name] = (sums, np.array([ncall if ncall > 0 else 1], dtype=np.int64))
        max_ncall = max(max_ncall, ncall)
    chunks, dataset = max_ncall, ""
    if len(data) - pos >= 4:  # optional: chunk count, then the dataset name
        chunks = take("<i", "the chunk count")
        if len(data) - pos >= 4:
            length = take("<i", "the dataset name length")
            if 0 < length <= len(data) - pos:
                dataset = data[pos : pos + length].split(b"\0", 1)[0].decode("utf-8", "replace")
    return Imatrix(entries, max(0, chunks), dataset, 0)


__all__ = [
    "Imatrix",
    "bos_added",
    "chunk_tokens",
    "collect_imatrix",
    "imatrix_gguf_bytes",
    "load_imatrix",
    "save_imatrix",
    "text_dataset_name",
]
