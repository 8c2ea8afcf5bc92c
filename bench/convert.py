"""Conversion speed and memory against a plain copy of the same bytes, in the same run.

    .venv/bin/python bench/convert.py [MODEL_DIR] [--to F16] [--repeat 3]

MODEL_DIR defaults to the embedded SmolLM2-135M-Instruct checkpoint. Each conversion and each
copy runs in a fresh subprocess so that its peak RSS (ru_maxrss) is its own; the page cache is
warm for both after the first round, so the ratio compares work, not disk. Medians are printed
(these machines are shared and noisy).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

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


def child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"benchmark child failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "model", nargs="?", help="HF model dir (default: embedded SmolLM2-135M-Instruct)"
    )
    ap.add_argument("--to", default="F16", help="GGUF type (default F16)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    if args.model:
        model = Path(args.model)
    else:
        from quantkit.demo import demo_model

        model = demo_model()
    files = sorted(str(p) for p in model.glob("*.safetensors"))
    from quantkit.checkpoint import Checkpoint

    with Checkpoint.open(model) as ck:
        largest = max(t.nbytes for t in ck.tensors.values())
        total = ck.nbytes

    conv, copy = [], []
    with tempfile.TemporaryDirectory(dir=model.parent) as tmp:
        for _ in range(args.repeat):
            copy.append(child(CHILD_COPY, tmp, *files))
            conv.append(
                child(CHILD_CONVERT, str(model), f"gguf:{args.to}", str(Path(tmp) / "out.gguf"))
            )

    def med(rows: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in rows)

    c_s, p_s = med(conv, "seconds"), med(copy, "seconds")
    gb = total / 1e9
    print(f"model: {model}  ({gb:.3f} GB of tensors, largest tensor {largest / 1e6:.1f} MB)")
    print(f"target: gguf:{args.to}, {args.repeat} rounds, medians")
    print(
        f"plain copy : {p_s:7.3f} s  {gb / p_s:6.2f} GB/s  peak RSS {med(copy, 'rss_mb'):7.1f} MB"
    )
    print(
        f"convert    : {c_s:7.3f} s  {gb / c_s:6.2f} GB/s  peak RSS {med(conv, 'rss_mb'):7.1f} MB"
        f"  (+{med(conv, 'import_seconds'):.2f} s imports; torch imported: {conv[0]['torch_loaded']})"
    )
    s_s, f_s = med(conv, "stream_seconds"), med(conv, "preflight_seconds")
    print(
        f"  of which : preflight (config, tensor index, tokenizer) {f_s:.3f} s,"
        f" weight streaming {s_s:.3f} s"
    )
    print(f"ratio convert/copy: {c_s / p_s:.2f}x  (weight streaming alone: {s_s / p_s:.2f}x)")


if __name__ == "__main__":
    main()
