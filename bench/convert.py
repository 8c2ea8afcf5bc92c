"""Conversion speed and memory against a plain copy of the same bytes, in the same run.

    .venv/bin/python bench/convert.py [MODEL_DIR] [--to F16] [--repeat 3] [--out DIR]
    .venv/bin/python bench/convert.py --moe-gb 2.0 [--repeat 1]

MODEL_DIR is any HF checkpoint folder: the embedded default when left out, or a random-weight
checkpoint of a real shape written by bench/shapes.py (Qwen2.5-1.5B, Llama-3-8B). ``--out``: where
the converted file and the copy go (default: a temporary folder beside MODEL_DIR); both are
deleted at the end. Run the benchmark with another environment's interpreter to measure that
environment's quantkit against the same copy (before/after a change).

``--moe-gb``: generate a Mixtral-shaped sharded safetensors checkpoint of at least that many GB
(random F16 weights, under the temp dir, deleted afterwards) and a 2-layer one with the same
largest output tensor (a stacked expert tensor), convert both, and compare peak RSS with the
largest output tensor: streaming means the two peaks are equal and the difference to that
tensor is a fixed overhead, however large the model.

Each conversion and each copy runs in a fresh subprocess, alternating; its peak memory is sampled
from outside (VmRSS and RssAnon of the child and any process it starts, every 10 ms, from
/proc/PID/status): RSS counts the checkpoint's file-backed pages while they are mapped, anonymous
memory is what the OOM killer counts. The page cache holds what fits of the checkpoint after the
first round, for the copy and the conversion alike, so the ratio compares work; medians are
printed (these machines are shared and noisy), with the load average beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import treemem  # bench/treemem.py, beside this script: memory of a process tree

CHILD_CONVERT = """
import json, resource, sys, time
t0 = time.perf_counter()
from quantkit.convert import convert
from pathlib import Path
Path(sys.argv[3]).unlink(missing_ok=True)  # start from nothing, like the copy
t1 = time.perf_counter()
res = convert(sys.argv[1], [sys.argv[2]], sys.argv[3])
t2 = time.perf_counter()
print(json.dumps({"seconds": t2 - t1, "import_seconds": t1 - t0, "read_bytes": res.read_bytes,
                  "stream_seconds": res.timings["stream"], "preflight_seconds": res.timings["preflight"],
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "torch_loaded": "torch" in sys.modules}))
"""

CHILD_COPY = """
import json, resource, shutil, sys, time
from pathlib import Path
src = [Path(p) for p in sys.argv[2:]]
n = 0
dst = [Path(sys.argv[1]) / f"copy-{i}" for i in range(len(src))]
for d in dst:  # start from nothing, like the conversion
    d.unlink(missing_ok=True)
t0 = time.perf_counter()
for p, d in zip(src, dst):
    shutil.copyfile(p, d)
    n += p.stat().st_size
t1 = time.perf_counter()
print(json.dumps({"seconds": t1 - t0, "bytes": n,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def child(code: str, *args: str, python: str | None = None) -> dict:
    """Run ``code`` in a fresh interpreter; its JSON result plus the peak RSS and anonymous
    memory of its process tree, sampled from outside."""
    # run outside the repository: `python -c` puts the working directory first on sys.path, and
    # another environment's interpreter would import this checkout's quantkit/ from there
    proc = subprocess.Popen(
        [python or sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tempfile.gettempdir(),
    )  # fmt: skip
    peak = {"rss": 0, "anon": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            rss, anon = treemem.sample(proc.pid)
            peak["rss"] = max(peak["rss"], rss // 1024)
            peak["anon"] = max(peak["anon"], anon // 1024)
            done.wait(0.01)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    stdout, stderr = proc.communicate()
    done.set()
    th.join()
    if proc.returncode:
        sys.exit(f"benchmark child failed:\n{stderr}")
    res = json.loads(stdout.strip().splitlines()[-1])
    res["tree_rss_mb"], res["tree_anon_mb"] = peak["rss"] / 1024, peak["anon"] / 1024
    return res


def load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


# Mixtral-shaped: each stacked expert tensor is n_expert × n_ff × n_embd F16 = 64 MiB, larger
# than any other tensor (embeddings are 8192 × 1024)
MOE_SHAPE = dict(hidden_size=1024, intermediate_size=4096, num_local_experts=8, n_vocab=8192)


def write_moe_checkpoint(out: Path, n_layer: int, shard_bytes: int = 1 << 30) -> int:
    """A random Mixtral checkpoint in F16, written shard by shard (one tensor in memory at a
    time); returns the bytes of its largest output tensor (a stacked expert tensor)."""
    import numpy as np
    from safetensors.numpy import save_file
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    h, ff, ne, nv = (MOE_SHAPE[k] for k in ("hidden_size", "intermediate_size",
                                              "num_local_experts", "n_vocab"))  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    shapes: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (nv, h))]
    for b in range(n_layer):
        p = f"model.layers.{b}."
        shapes += [
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
        shapes += [
            (p + f"self_attn.{x}_proj.weight", (h if x in "qo" else h // 4, h)) for x in "qkvo"
        ]
        shapes += [(p + "block_sparse_moe.gate.weight", (ne, h))]
        for x in range(ne):
            for w, shp in (("w1", (ff, h)), ("w2", (h, ff)), ("w3", (ff, h))):
                shapes.append((p + f"block_sparse_moe.experts.{x}.{w}.weight", shp))
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (nv, h))]
    index, shard, size, n = {}, {}, 0, 0

    def flush() -> None:
        nonlocal shard, size, n
        name = f"model-{n:05d}.safetensors"
        save_file(shard, str(out / name), metadata={"format": "pt"})
        index.update({k: name for k in shard})
        shard, size, n = {}, 0, n + 1

    for name, shp in shapes:
        a = rng.standard_normal(shp, dtype=np.float32) * 0.02
        if name.endswith("norm.weight"):
            a += 1.0
        shard[name] = a.astype(np.float16)
        size += shard[name].nbytes
        if size >= shard_bytes:
            flush()
    if shard:
        flush()
    (out / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": index})
    )
    config = {
        "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
        "hidden_size": h, "intermediate_size": ff, "num_hidden_layers": n_layer,
        "num_attention_heads": 16, "num_key_value_heads": 4, "num_local_experts": ne,
        "num_experts_per_tok": 2, "vocab_size": nv, "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5, "rope_theta": 1e6, "torch_dtype": "float16",
        "tie_word_embeddings": False,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(
        ["a small tokenizer for a generated checkpoint"] * 10,
        trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            show_progress=False),
    )  # fmt: skip
    tok.save(str(out / "tokenizer.json"))
    return ne * ff * h * 2


def moe_bench(gb: float, repeat: int) -> None:
    h, ff, ne = (MOE_SHAPE[k] for k in ("hidden_size", "intermediate_size", "num_local_experts"))
    per_layer = (3 * ne * ff * h + 2 * h * h + 2 * h * h // 4) * 2
    n_big = max(3, int(-(-gb * 1e9 // per_layer)))
    rows = []
    with tempfile.TemporaryDirectory(prefix="quantkit-moe-bench-") as tmp:
        for n_layer in (2, n_big):
            model = Path(tmp) / f"moe-{n_layer}"
            # generated in a subprocess: a child forked from a process that held the shards
            # would start with that RSS in its ru_maxrss (Linux keeps it across exec)
            largest = int(
                subprocess.run(
                    [sys.executable, __file__, "--write-moe", str(model), str(n_layer)],
                    check=True, capture_output=True, text=True,
                ).stdout.split()[-1]
            )  # fmt: skip
            total = sum(p.stat().st_size for p in model.glob("*.safetensors"))
            files = sorted(str(p) for p in model.glob("*.safetensors"))
            conv, copy = [], []
            for _ in range(repeat):
                copy.append(child(CHILD_COPY, tmp, *files))
                conv.append(child(CHILD_CONVERT, str(model), "gguf:F16", str(Path(tmp) / "o.gguf")))
                (Path(tmp) / "o.gguf").unlink(missing_ok=True)
            for p in Path(tmp).glob("copy-*"):
                p.unlink()
            rss = statistics.median(r["rss_mb"] for r in conv)
            rows.append((n_layer, len(files), total, largest, rss,
                         statistics.median(r["seconds"] for r in conv),
                         statistics.median(r["seconds"] for r in copy)))  # fmt: skip
            shutil.rmtree(model)
    print(f"Mixtral-shaped F16 checkpoints → gguf:F16, {repeat} round(s), medians")
    print(f"{'layers':>6} {'shards':>6} {'model GB':>9} {'largest out MB':>15} {'peak RSS MB':>12}"
          f" {'RSS - largest':>14} {'convert s':>10} {'copy s':>7}")  # fmt: skip
    for n_layer, n_files, total, largest, rss, c_s, p_s in rows:
        print(f"{n_layer:6d} {n_files:6d} {total / 1e9:9.2f} {largest / 2**20:15.1f} {rss:12.1f}"
              f" {rss - largest / 2**20:14.1f} {c_s:10.2f} {p_s:7.2f}")  # fmt: skip
    (_, _, t0, _, r0, _, _), (_, _, t1, _, r1, _, _) = rows
    print(f"model size ×{t1 / t0:.1f}, peak RSS ×{r1 / r0:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "model", nargs="?", help="HF model dir (default: embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--to", default="F16", help="GGUF type (default F16)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", help="folder for the outputs (default: beside MODEL_DIR)")
    ap.add_argument(
        "--python", help="interpreter whose quantkit converts (default: this one), for before/after"
    )
    ap.add_argument("--moe-gb", type=float, help="generate a MoE checkpoint of this size instead")
    ap.add_argument("--write-moe", nargs=2, metavar=("DIR", "LAYERS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.write_moe:
        print(write_moe_checkpoint(Path(args.write_moe[0]), int(args.write_moe[1])))
        return
    if args.moe_gb:
        moe_bench(args.moe_gb, args.repeat)
        return

    if args.model:
        model = Path(args.model)
    else:
        from quantkit.demo import demo_model

        model = demo_model()
    files = sorted(str(p) for p in model.glob("*.safetensors"))
    from quantkit.checkpoint import Checkpoint

    with Checkpoint.open(model) as ck:
        largest = max(t.nbytes for t in ck.tensors.values())
    file_bytes = sum(Path(f).stat().st_size for f in files)

    conv, copy = [], []
    out_root = Path(args.out) if args.out else model.parent
    out_root.mkdir(parents=True, exist_ok=True)
    loads = [load()]
    with tempfile.TemporaryDirectory(dir=out_root, prefix="bench-convert-") as tmp:
        for _ in range(args.repeat):
            copy.append(child(CHILD_COPY, tmp, *files))
            (Path(tmp) / "out.gguf").unlink(missing_ok=True)  # room for the conversion
            for p in Path(tmp).glob("copy-*"):
                p.unlink()
            conv.append(child(CHILD_CONVERT, str(model), f"gguf:{args.to}",
                              str(Path(tmp) / "out.gguf"), python=args.python))  # fmt: skip
            (Path(tmp) / "out.gguf").unlink(missing_ok=True)
            loads.append(load())

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    c_s, p_s = med(conv, "seconds"), med(copy, "seconds")
    gb = file_bytes / 1e9
    print(f"model: {model}  ({gb:.3f} GB in {len(files)} safetensors file(s), largest tensor "
          f"{largest / 1e6:.1f} MB)")  # fmt: skip
    print(f"target: gguf:{args.to}, {args.repeat} rounds, medians; quantkit from "
          f"{args.python or sys.executable}; load average before/after each round: "
          f"{' | '.join(loads)}")  # fmt: skip
    print(f"plain copy : {p_s:7.3f} s  {file_bytes / 1e6 / p_s:7.1f} MB/s  "
          f"peak RSS {med(copy, 'tree_rss_mb'):7.1f} MB (anon {med(copy, 'tree_anon_mb'):6.1f})")  # fmt: skip
    print(f"convert    : {c_s:7.3f} s  {file_bytes / 1e6 / c_s:7.1f} MB/s  "
          f"peak RSS {med(conv, 'tree_rss_mb'):7.1f} MB (anon {med(conv, 'tree_anon_mb'):6.1f})"
          f"  (+{med(conv, 'import_seconds'):.2f} s imports; torch imported: "
          f"{conv[0]['torch_loaded']})")  # fmt: skip
    s_s, f_s = med(conv, "stream_seconds"), med(conv, "preflight_seconds")
    print(
        f"  of which : preflight (config, tensor index, tokenizer) {f_s:.3f} s,"
        f" weight streaming {s_s:.3f} s"
    )
    print(f"largest tensor {largest / 1e6:.1f} MB; peak anonymous memory "
          f"{med(conv, 'tree_anon_mb') / (largest / 1e6):.2f}x that")  # fmt: skip
    print(f"ratio convert/copy: {c_s / p_s:.2f}x  (weight streaming alone: {s_s / p_s:.2f}x)")
    print("per round (copy s, convert s): " + ", ".join(
        f"({a['seconds']:.2f}, {b['seconds']:.2f})" for a, b in zip(copy, conv, strict=True)))  # fmt: skip


if __name__ == "__main__":
    main()
