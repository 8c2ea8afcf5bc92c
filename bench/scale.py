"""Every quantkit step on a checkpoint of a real model's shape: wall time and peak memory of the
whole process tree, against a plain copy of the same checkpoint in the same run.

    .venv/bin/python bench/scale.py tiny --work /tmp/scale-tiny
    .venv/bin/python bench/scale.py qwen2.5-1.5b --work /data/out --checkpoint /data/qwen-1.5b
    .venv/bin/python bench/scale.py llama3-8b --work /data/out --checkpoint /data/llama3-8b \\
        --steps copy,convert,imatrix,iq4,validate

Without ``--checkpoint`` the random checkpoint of the shape is written first into WORK
(bench/shapes.py: BF16, N(0, 0.02) weights, so only time and memory mean anything). The steps,
each one ``quantkit`` command in its own process:

    copy      cp of the checkpoint's safetensors files (the baseline: disk speed)
    convert   convert CKPT --to gguf:F16 --to gguf:Q4_K_M
    imatrix   imatrix CKPT --calib TEXT --chunks 1
    iq4       convert F16.gguf --to gguf:IQ4_XS --imatrix im.gguf
    validate  validate Q4_K_M.gguf --reference CKPT --data TEXT --chunks 1 --ctx 256 --pp 0 --tg 0
    auto      convert CKPT --to gguf:auto:size=<Q4_K_M bytes> --imatrix im.gguf --dry-run
    auto-calib  the same with --calib TEXT: the sensitivity pass with its Fisher weights (the
              decoder run a layer at a time) and its llama.cpp probes; a dry run, so no selection

Memory is sampled from /proc every 0.2 s over the step's process and all its descendants:
"RSS" is the sum of their VmRSS, "anon" the sum of RssAnon (what the OOM killer counts; pages
of memory-mapped files aside); the peak of each sum is printed. Outputs are removed at the end
unless ``--keep``. The host is shared: the load average is printed beside the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import treemem  # bench/treemem.py, beside this script: memory of a process tree

HERE = Path(__file__).resolve().parent
STEPS = ("copy", "convert", "imatrix", "iq4", "validate", "auto", "auto-calib")
SAMPLE_S = 0.2
FALLBACK_TEXT = (
    "The committee met on a grey morning to weigh the harbour plans. Engineers argued that the "
    "old breakwater, built in 1911, would not survive another decade of winter storms, while "
    "the council worried about cost. "
) * 300


@dataclass
class Result:
    step: str
    rc: int
    seconds: float
    peak_rss: int
    peak_anon: int
    detail: str = ""


def run_step(step: str, cmd: list[str], log: Path, timeout: float) -> Result:
    """Run ``cmd``, sampling its process tree's memory until it exits (killed at ``timeout``)."""
    peak = [0, 0]
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                rss, anon = treemem.sample(proc.pid)
                peak[0], peak[1] = max(peak[0], rss), max(peak[1], anon)
                done.wait(SAMPLE_S)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, 9)
            rc = proc.wait()
            rc = 124
        done.set()
        th.join()
    return Result(step, rc, time.perf_counter() - t0, peak[0], peak[1])


def gib(n: int) -> str:
    return f"{n / 2**30:.2f}"


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(HERE))
    from shapes import SHAPES, n_params, write_checkpoint

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("shape", choices=sorted(SHAPES))
    ap.add_argument(
        "--work", type=Path, required=True, help="folder for outputs (emptied at the end)"
    )
    ap.add_argument("--checkpoint", type=Path, help="an existing checkpoint of the shape")
    ap.add_argument("--steps", default=",".join(STEPS), help=f"comma list of {', '.join(STEPS)}")
    ap.add_argument("--calib", type=Path, help="calibration and evaluation text")
    ap.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per step")
    ap.add_argument("--keep", action="store_true", help="keep the outputs")
    ap.add_argument("--json", type=Path, help="also write the results as JSON")
    a = ap.parse_args(argv)
    steps = [s for s in a.steps.split(",") if s]
    if bad := [s for s in steps if s not in STEPS]:
        ap.error(f"unknown steps: {', '.join(bad)}")

    a.work.mkdir(parents=True, exist_ok=True)
    made_ckpt = a.checkpoint is None
    ckpt = a.checkpoint or a.work / f"{a.shape}-ckpt"
    if made_ckpt and not (ckpt / "config.json").exists():
        print(f"writing a random {a.shape} checkpoint to {ckpt}", flush=True)
        write_checkpoint(a.shape, ckpt, log=lambda s: print(s, flush=True))
    text = a.calib
    if text is None:
        fixture = HERE.parents[1] / "shared/fixtures/wikitext-2-raw/wiki.test.raw"
        text = a.work / "text.txt"
        text.write_text(fixture.read_text()[:200_000] if fixture.is_file() else FALLBACK_TEXT)

    qk = [str(Path(sys.executable).with_name("quantkit"))]
    out = a.work / "out"
    out.mkdir(exist_ok=True)
    f16, q4, iq4 = out / "m-F16.gguf", out / "m-Q4_K_M.gguf", out / "m-IQ4_XS.gguf"
    im = out / "im.gguf"
    th = ["--threads", str(a.threads)]
    results: list[Result] = []
    for step in steps:
        if step == "copy":
            dst = a.work / "copy"
            dst.mkdir(exist_ok=True)
            cmd = ["cp", *map(str, sorted(ckpt.glob("*.safetensors"))), str(dst)]
        elif step == "convert":
            cmd = qk + ["convert", str(ckpt), "--to", "gguf:F16", "--to", "gguf:Q4_K_M",
                        "-o", str(out), "--name", "m", "--force", *th]  # fmt: skip
        elif step == "imatrix":
            cmd = qk + ["imatrix", str(ckpt), "--calib", str(text), "--chunks", "1",
                        "-o", str(im), "--force", *th]  # fmt: skip
        elif step == "iq4":
            cmd = qk + ["convert", str(f16), "--to", "gguf:IQ4_XS", "--imatrix", str(im),
                        "-o", str(iq4), "--force", *th]  # fmt: skip
        elif step == "validate":
            cmd = qk + ["validate", str(q4), "--reference", str(ckpt), "--data", str(text),
                        "--chunks", "1", "--ctx", "256", "--pp", "0", "--tg", "0", "--no-cache",
                        "--json", str(out / "report.json"), *th]  # fmt: skip
        else:  # auto, auto-calib
            size = q4.stat().st_size if q4.is_file() else 0
            calib = ["--calib", str(text)] if step == "auto-calib" else []
            cmd = qk + ["convert", str(ckpt), "--to", f"gguf:auto:size={size}",
                        "--imatrix", str(im), *calib, "--dry-run", "-o", str(out), *th]  # fmt: skip
        print(f"[{step}] {' '.join(cmd)}", flush=True)
        r = run_step(step, cmd, a.work / f"{step}.log", a.timeout)
        if step == "copy":
            shutil.rmtree(a.work / "copy", ignore_errors=True)
        if r.rc != 0:
            tail = (a.work / f"{step}.log").read_text(errors="replace").strip().splitlines()
            r.detail = tail[-1][:200] if tail else ""
        results.append(r)
        print(f"[{step}] exit {r.rc} in {r.seconds:.1f} s, peak RSS {gib(r.peak_rss)} GiB, "
              f"anon {gib(r.peak_anon)} GiB {r.detail}", flush=True)  # fmt: skip

    nbytes = sum(p.stat().st_size for p in ckpt.glob("*.safetensors"))
    cfg = json.loads((ckpt / "config.json").read_text())
    base = next((r.seconds for r in results if r.step == "copy" and r.rc == 0), None)
    load = os.getloadavg()
    print()
    print(f"checkpoint: {ckpt} ({a.shape}, {n_params(cfg) / 1e9:.2f} B params, "
          f"{nbytes / 1e9:.2f} GB)")  # fmt: skip
    print(f"host: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"load {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}; threads {a.threads}")  # fmt: skip
    print(f"{'step':<9} {'exit':>4} {'wall s':>8} {'x copy':>7} {'peak RSS GiB':>13} "
          f"{'peak anon GiB':>14}")  # fmt: skip
    for r in results:
        ratio = f"{r.seconds / base:.1f}" if base else "-"
        print(f"{r.step:<9} {r.rc:>4} {r.seconds:>8.1f} {ratio:>7} {gib(r.peak_rss):>13} "
              f"{gib(r.peak_anon):>14}")  # fmt: skip
    if a.json:
        a.json.write_text(json.dumps({
            "shape": a.shape, "checkpoint": str(ckpt), "bytes": nbytes, "load": load,
            "threads": a.threads,
            "steps": [r.__dict__ for r in results],
        }, indent=2))  # fmt: skip
    if not a.keep:
        shutil.rmtree(out, ignore_errors=True)
        if made_ckpt:
            shutil.rmtree(ckpt, ignore_errors=True)
    return 0 if all(r.rc == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
