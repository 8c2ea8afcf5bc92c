"""Random-weight HF checkpoints of real model shapes, written directly with safetensors.

    python bench/shapes.py llama3-8b /data/llama3-8b-random
    python bench/shapes.py qwen2.5-1.5b /data/qwen-1.5b-random
    python bench/shapes.py tiny /tmp/tiny-random

Only time and memory mean anything on these checkpoints: the weights are N(0, 0.02) (norms 1),
stored in BF16 like the released models, sharded at most 4 GB per file with an index, as
``save_pretrained`` lays them out. The tokenizer is a small byte-level BPE; ``vocab_size`` in the
config keeps the real model's (a padded vocabulary, which transformers and llama.cpp accept), so the
embedding and output matrices have their real sizes.

One tensor row block is in memory at a time (64 MiB of float32), so writing an 8B checkpoint takes
about as much memory as writing a 135M one. Needs numpy, safetensors and tokenizers only.
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
import time
from pathlib import Path

import numpy as np

# The released configs' shape fields (config.json of meta-llama/Meta-Llama-3-8B and
# Qwen/Qwen2.5-1.5B on the Hub).
SHAPES: dict[str, dict] = {
    "llama3-8b": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False, attention_bias=False,
        bos_token_id=0, eos_token_id=1,
    ),
    "qwen2.5-1.5b": dict(
        architectures=["Qwen2ForCausalLM"], model_type="qwen2", hidden_size=1536,
        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
        num_key_value_heads=2, vocab_size=151936, max_position_embeddings=32768,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=True,
        bos_token_id=0, eos_token_id=1,
    ),
    "tiny": dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=256,
        intermediate_size=512, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=2048, max_position_embeddings=1024, rms_norm_eps=1e-5, rope_theta=10000.0,
        tie_word_embeddings=False, attention_bias=False, bos_token_id=0, eos_token_id=1,
    ),
}  # fmt: skip

SHARD_BYTES = 4 * 10**9
BLOCK_ELEMS = 16 << 20  # float32 elements generated at a time (64 MiB)


def tensor_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...]]]:
    """Every tensor of the HF checkpoint, in the order transformers writes them."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = h // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    bias = cfg["model_type"] == "qwen2"
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
        if bias:
            out += [(p + "self_attn.q_proj.bias", (h,)), (p + "self_attn.k_proj.bias", (kv,)),
                    (p + "self_attn.v_proj.bias", (kv,))]  # fmt: skip
        out += [
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (f, h)),
            (p + "mlp.up_proj.weight", (f, h)),
            (p + "mlp.down_proj.weight", (h, f)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg.get("tie_word_embeddings"):
        out.append(("lm_head.weight", (v, h)))
    return out


def n_params(cfg: dict) -> int:
    return sum(int(np.prod(s)) for _, s in tensor_shapes(cfg))


def _bf16_block(rng: np.random.Generator, n: int, norm: bool) -> bytes:
    if norm:
        x = np.ones(n, dtype=np.float32)
    else:
        x = rng.standard_normal(n, dtype=np.float32)
        x *= 0.02
    # BF16 = the upper 16 bits of the float32 (round to nearest even)
    u = x.view(np.uint32)
    u += 0x7FFF + ((u >> 16) & 1)
    return (u >> 16).astype(np.uint16).tobytes()


def _write_shard(
    path: Path, items: list[tuple[str, tuple[int, ...]]], rng: np.random.Generator, progress
) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape in items:
        nbytes = int(np.prod(shape)) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for name, shape in items:
            left = int(np.prod(shape))
            norm = name.endswith("norm.weight")
            while left:
                n = min(left, BLOCK_ELEMS)
                fh.write(_bf16_block(rng, n, norm))
                left -= n
                progress(n * 2)
    tmp.rename(path)


def _tokenizer(out: Path, cfg: dict) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    text = (Path(__file__).read_text() + " Once upon a time there was a little robot. ") * 20
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([text], trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
        "eos_token": "<|end_of_text|>", "add_bos_token": True, "model_max_length": 8192,
    }, indent=2))  # fmt: skip


def write_checkpoint(shape: str, out: Path, seed: int = 0, log=print) -> dict:
    """Write the random checkpoint; returns {"params", "bytes", "seconds", "shards"}."""
    cfg = dict(SHAPES[shape])
    out.mkdir(parents=True, exist_ok=True)
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, s in tensor_shapes(cfg):
        nbytes = int(np.prod(s)) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append((name, s))
        size += nbytes
    total = sum(int(np.prod(s)) * 2 for sh in shards for _, s in sh)
    rng = np.random.default_rng(seed)
    done, t0, last = 0, time.perf_counter(), 0.0

    def progress(n: int) -> None:
        nonlocal done, last
        done += n
        now = time.perf_counter() - t0
        if now - last >= 10 or done == total:
            last = now
            rate = done / max(now, 1e-9)
            log(f"  {done / 1e9:6.2f} / {total / 1e9:.2f} GB  {rate / 1e6:5.0f} MB/s  "
                f"ETA {(total - done) / max(rate, 1):4.0f} s")  # fmt: skip

    weight_map = {}
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for fname, items in zip(names, shards, strict=True):
        _write_shard(out / fname, items, rng, progress)
        weight_map.update({n: fname for n, _ in items})
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2)
    )
    cfg.update(torch_dtype="bfloat16", hidden_act="silu", initializer_range=0.02, use_cache=True)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "generation_config.json").write_text(
        json.dumps({"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"]})
    )
    _tokenizer(out, cfg)
    return {"params": n_params(cfg), "bytes": total, "seconds": time.perf_counter() - t0,
            "shards": len(shards)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument("out", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if (a.out / "config.json").exists():
        print(f"{a.out} already holds a checkpoint", file=sys.stderr)
        return 2
    r = write_checkpoint(a.shape, a.out, a.seed)
    print(json.dumps({"shape": a.shape, **r}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
