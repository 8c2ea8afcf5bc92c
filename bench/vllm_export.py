"""vLLM exports (GPTQ, AWQ, FP8) through quantkit vs the same llm-compressor call made directly.

    .venv/bin/python bench/vllm_export.py [MODEL_DIR] [--to gptq:group=64 --to awq:group=64
        --to fp8] [--calib FILE] [--samples 32] [--seq-len 512] [--repeat 1] [--quality]

MODEL_DIR defaults to the embedded SmolLM2-135M-Instruct; --calib to the shared TinyStories text.
For every target, in the same run:

  quantkit: ``quantkit convert MODEL --to T --calib ... -o OUT`` as a user runs it (a fresh
            process: preflight, tokenization, the worker in the llmcompressor env, side files);
  direct:   a script in the llmcompressor env that loads the model, calls ``oneshot`` with the
            same modifier and the same calibration token ids, and ``save_pretrained(...,
            save_compressed=True)``: what a user of llm-compressor would write by hand.

Wall time and peak RSS (ru_maxrss of the process tree, from wait4) are printed with the ratio
quantkit / direct (expected ≤ 1.1). Medians over --repeat; the two sides alternate which runs
first, so use an even --repeat on a machine whose load drifts. ``--quality`` also scores each
quantkit export on held-out text (wikitext-2 test, 20 × 512 tokens) with transformers in the
llmcompressor env (which decompresses compressed-tensors checkpoints): PPL against the
original's, and the mean KL divergence to the original's next-token distribution.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"

DIRECT = r"""
import importlib.util, json, sys, time
# the worker's recipe/calibration helpers, loaded by path (its folder must not go on sys.path:
# its neighbours, targets.py, export.py, settings.py …, would shadow packages of those names)
spec = importlib.util.spec_from_file_location("llmc_worker", sys.argv[2])
w = importlib.util.module_from_spec(spec)
spec.loader.exec_module(w)
job = json.loads(open(sys.argv[1]).read())
t0 = time.perf_counter()
w.cpu_quirks()
from llmcompressor import oneshot
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(job["model"], dtype="auto")
tok = AutoTokenizer.from_pretrained(job["model"])
ds = w.load_calibration(job)
kw = {} if ds is None else dict(dataset=ds, max_seq_length=job["seq_len"],
                                num_calibration_samples=len(ds), shuffle_calibration_samples=False)
oneshot(model=model, recipe=w.build_recipe(job), **kw)
model.save_pretrained(job["output"], save_compressed=True)
tok.save_pretrained(job["output"])
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""

QUALITY = r"""
import json, math, sys
import numpy as np, torch
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)
job = json.loads(open(sys.argv[1]).read())
chunks = torch.tensor(np.load(job["ids"]))
half = chunks.shape[1] // 2  # llama-perplexity: score the second half of each chunk
def logprobs(path):  # [chunks, scored positions, vocab], scored half only
    m = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for c in chunks:
            out.append(torch.log_softmax(m(c[None]).logits[0, half:-1].float(), -1))
    del m
    return torch.stack(out)
ref = logprobs(job["reference"])
def score(lp):
    nll = -lp.gather(-1, chunks[:, half + 1:, None])[..., 0]
    kld = (ref.exp() * (ref - lp)).sum(-1)
    return {"ppl": math.exp(nll.mean().item()), "kld": kld.mean().item()}
res = {"reference": score(ref)}
for name, path in job["artifacts"].items():
    res[name] = score(logprobs(path))
print(json.dumps(res))
"""


def run_tree(cmd: list[str], env: dict | None = None) -> tuple[float, int, str]:
    """Run ``cmd``; wall seconds, peak RSS in bytes of it and its descendants, stdout."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        # Each measured process tree in its own session: with the kernel's autogroup
        # scheduling (/proc/sys/kernel/sched_autogroup_enabled = 1, the default on desktop and
        # many server kernels) CPU time is shared between sessions first. quantkit starts its
        # llm-compressor worker in a new session (quantize/vllm/export.py run_worker); a direct child
        # left in this bench's session would compete with everything else started from the
        # same shell, and on a loaded machine came out 3x slower (ratio 0.32, not a real win).
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        _, status, ru = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode()
    if proc.returncode:
        sys.exit(f"benchmark child failed ({' '.join(cmd[:4])} ...):\n{stderr[-3000:]}")
    return seconds, ru.ru_maxrss * 1024, stdout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--to", action="append", dest="targets")
    ap.add_argument(
        "--calib", type=Path, default=FIXTURES / "tinystories/tinystories_train_head.txt"
    )
    ap.add_argument("--samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--quality", action="store_true")
    ap.add_argument("--eval", type=Path, default=FIXTURES / "wikitext-2-raw/wiki.test.raw")
    ap.add_argument("--keep", type=Path, default=None, help="keep the exports in this folder")
    a = ap.parse_args()

    from quantkit import envs
    from quantkit.demo import demo_model
    from quantkit.quantize import vllm
    from quantkit.targets import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN, parse_target

    model = a.model or demo_model()
    targets = a.targets or ["gptq:group=64", "awq:group=64", "fp8"]
    samples = a.samples or DEFAULT_SAMPLES
    seq_len = a.seq_len or DEFAULT_SEQ_LEN
    py = envs.python("llmcompressor")
    ids = vllm.calibration_ids(model, a.calib, samples, seq_len)
    work = Path(tempfile.mkdtemp(prefix="qk-bench-vllm-", dir=a.keep))
    import numpy as np

    np.save(work / "calib.npy", ids)
    print(
        f"model {model}\ncalibration {samples} × {seq_len} tokens of {a.calib.name}; "
        f"llmcompressor env {py.parent.parent.name}; {os.cpu_count()} CPUs\n"
    )
    rows = []
    exports: dict[str, str] = {}
    for spec in targets:
        t = parse_target(spec)
        q_runs, d_runs = [], []
        for r in range(a.repeat):
            out_q = work / f"{t.label()}-quantkit-{r}"
            cmd = [
                sys.executable,
                "-m",
                "quantkit.cli",
                "convert",
                str(model),
                "--to",
                spec,
                "-o",
                str(out_q),
                "--samples",
                str(samples),
                "--seq-len",
                str(seq_len),
                "--json",
            ]
            if t.needs_calibration:
                cmd += ["--calib", str(a.calib)]
            env = {**os.environ}
            env.pop("QUANTKIT_DEBUG", None)
            exports[t.label()] = str(out_q)
            job = {
                "model": str(model),
                "output": str(work / f"{t.label()}-direct-{r}"),
                "recipe": t.to_recipe(),
                "ignore": list(vllm.DEFAULT_IGNORE),
                "seq_len": seq_len,
            }
            if t.needs_calibration:
                job["calib_ids"] = str(work / "calib.npy")
            (work / "job.json").write_text(json.dumps(job))
            direct = [
                str(py),
                "-I",
                "-c",
                DIRECT,
                str(work / "job.json"),
                str(REPO / "quantize" / "vllm" / "llmc_worker.py"),
            ]
            # Alternate which side runs first (q d, d q, q d, ...): on a shared machine the load
            # drifts over minutes, and a fixed order hands that drift to one side every repeat
            # (measured: 0.67 with the load rising, 1.16 with it falling, same code).
            if r % 2 == 0:
                q_runs.append(run_tree(cmd, env)[:2])
                d_runs.append(run_tree(direct)[:2])
            else:
                d_runs.append(run_tree(direct)[:2])
                q_runs.append(run_tree(cmd, env)[:2])
        qs, qr = statistics.median(x[0] for x in q_runs), statistics.median(x[1] for x in q_runs)
        ds, dr = statistics.median(x[0] for x in d_runs), statistics.median(x[1] for x in d_runs)
        rows.append(
            [
                spec,
                f"{qs:.1f}",
                f"{ds:.1f}",
                f"{qs / ds:.3f}",
                f"{qr / 2**20:.0f}",
                f"{dr / 2**20:.0f}",
                f"{qr / dr:.3f}",
            ]
        )
        print(
            f"{spec}: quantkit {qs:.1f} s / {qr / 2**20:.0f} MiB, direct {ds:.1f} s / "
            f"{dr / 2**20:.0f} MiB",
            flush=True,
        )

    from quantkit.table import format_table

    print()
    print(
        format_table(
            [
                "target",
                "quantkit s",
                "direct s",
                "time ratio",
                "quantkit MiB",
                "direct MiB",
                "RSS ratio",
            ],
            rows,
        )
    )
    if a.quality:
        from quantkit.quantize.gguf.imatrix import chunk_tokens
        from quantkit.text import read_text
        from quantkit.validate.harness import tokenize_reference

        toks, bos = tokenize_reference(model, read_text(a.eval))
        ev = np.asarray(chunk_tokens(toks, 512, 20, bos), dtype=np.int64)
        np.save(work / "eval.npy", ev)
        (work / "q.json").write_text(
            json.dumps(
                {"ids": str(work / "eval.npy"), "reference": str(model), "artifacts": exports}
            )
        )
        _, _, out = run_tree([str(py), "-c", QUALITY, str(work / "q.json")])
        res = json.loads(out.strip().splitlines()[-1])
        ref = res["reference"]["ppl"]
        print(
            f"\nquality on {a.eval.name}, 20 × 512 tokens (second halves scored), transformers "
            "float32 in the llmcompressor env:"
        )
        print(
            format_table(
                ["model", "PPL", "ΔPPL %", "mean KLD"],
                [
                    [k, f"{v['ppl']:.3f}", f"{100 * (v['ppl'] / ref - 1):+.2f}", f"{v['kld']:.4f}"]
                    for k, v in res.items()
                ],
            )
        )
    if a.keep is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"\nexports kept in {work}")


if __name__ == "__main__":
    main()
