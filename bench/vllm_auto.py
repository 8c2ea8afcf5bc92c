"""gptq:auto's sensitivity proxy against measured KLD, on the embedded default model.

    .venv/bin/python bench/vllm_auto.py [--pairs 40] [--fixtures ../shared/fixtures]

Calibration: the first 400 KB of tinystories_train_head.txt, in quantkit's default windows (16 ×
256 tokens), exactly what ``convert --to gptq:auto --calib`` uses, so the sensitivity comes from
its cache. ``--pairs`` (group, scheme) pairs are drawn at random (seed 0) among the non-float
options; each is quantized alone (compressed-tensors' round to nearest, as the proxy assumes),
and its mean KLD against the float model measured with transformers on --eval-samples windows
of wiki.test.raw (disjoint from the calibration text). Prints the Spearman rank correlation of
the predicted KLD (gain × error) and of the raw error against the measured KLD, overall and
within one scheme.

``--sample-check``: only the row-sampled proxy against the full one (every row of every Linear),
every default scheme, same model and calibration: time of each in this process, Spearman over
group × scheme pairs, relative differences against the stated error bars. No vLLM needed.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def spearman(a: list[float], b: list[float]) -> float:
    ra = np.argsort(np.argsort(a)).astype(float)
    rb = np.argsort(np.argsort(b)).astype(float)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--pairs", type=int, default=40)
    ap.add_argument("--eval-samples", type=int, default=4)
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--sample-check", action="store_true")
    args = ap.parse_args()

    import torch

    from quantkit.demo import demo_model
    from quantkit.quantize.vllm.auto import sensitivity as sn
    from quantkit.quantize.vllm.auto.host import runnable
    from quantkit.quantize.vllm.auto.plan import group_options, planned_groups
    from quantkit.quantize.vllm.auto.spec import parse_vllm_auto
    from quantkit.quantize.vllm.calibration import calibration_ids
    from quantkit.quantize.vllm.targets import DEFAULT_IGNORE
    from quantkit.targets import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

    torch.set_num_threads(args.threads)
    model_dir = demo_model()
    calib = Path("/tmp/vllm-auto-calib.txt")
    calib.write_text(
        (args.fixtures / "tinystories" / "tinystories_train_head.txt").read_text()[:400_000]
    )
    wiki = args.fixtures / "wikitext-2-raw" / "wiki.test.raw"
    evalf = Path("/tmp/vllm-auto-eval.txt")
    evalf.write_text(wiki.read_text()[:200_000])

    groups, dtype = planned_groups(model_dir, DEFAULT_IGNORE)
    if args.sample_check:
        sample_check(model_dir, groups, dtype, calib, args)
        return
    spec = parse_vllm_auto("gptq:auto:bits=4.5")
    options = group_options(groups, runnable(spec, dtype).schemes)
    ids = calibration_ids(model_dir, calib, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN)
    t0 = time.perf_counter()
    sens = sn.measure(model_dir, groups, options, ids, dtype=dtype, threads=args.threads)
    print(f"sensitivity: {'cache' if sens.cache_hit else 'measured'} in "
          f"{time.perf_counter() - t0:.1f} s; gains {sens.gains}")  # fmt: skip

    eval_ids = calibration_ids(model_dir, evalf, args.eval_samples, DEFAULT_SEQ_LEN)
    model = sn.load_model(model_dir)
    scale_dtype = getattr(torch, dtype)
    ref = sn.importance(model, [], eval_ids)["ref"]
    pairs = [(g, s) for g in groups for s in options[g.name] if s.kind != "float"]
    random.Random(0).shuffle(pairs)
    rows = []
    t0 = time.perf_counter()
    for g, s in pairs[: args.pairs]:
        saved = sn.set_scheme(model, [g], s, scale_dtype)
        kld = sn.mean_kld(model, eval_ids, ref)
        sn.restore(model, saved)
        rows.append({"group": g.name, "kind": g.kind, "scheme": s.name, "measured": kld,
                     "predicted": sens.kld(g, s.name), "raw": sens.errors[g.name][s.name]})  # fmt: skip
        print(f"{g.name:38s} {s.name:7s} measured {kld:.3e} predicted {rows[-1]['predicted']:.3e}")
    meas = [r["measured"] for r in rows]
    out = {
        "pairs": len(rows),
        "seconds": round(time.perf_counter() - t0, 1),
        "spearman_predicted": spearman([r["predicted"] for r in rows], meas),
        "spearman_raw_error": spearman([r["raw"] for r in rows], meas),
    }
    for by in ("scheme", "kind"):  # within one scheme, and within one layer kind
        out[f"by_{by}"] = {}
        for name in sorted({r[by] for r in rows}):
            sub = [r for r in rows if r[by] == name]
            if len(sub) >= 5:
                out[f"by_{by}"][name] = {
                    "pairs": len(sub),
                    "spearman": spearman(
                        [r["predicted"] for r in sub], [r["measured"] for r in sub]
                    ),
                }
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps({**out, "rows": rows}, indent=2))


def sample_check(model_dir: Path, groups, dtype: str, calib: Path, args) -> None:
    import os

    import torch

    from quantkit.quantize.vllm.auto import sensitivity as sn
    from quantkit.quantize.vllm.auto.plan import group_options
    from quantkit.quantize.vllm.auto.schemes import DEFAULT_TYPES, scheme
    from quantkit.quantize.vllm.calibration import calibration_ids
    from quantkit.targets import DEFAULT_SAMPLES, DEFAULT_SEQ_LEN

    print(f"load {os.getloadavg()[0]:.2f} (1 min), threads {args.threads}")
    options = group_options(groups, [scheme(n) for n in DEFAULT_TYPES])
    ids = calibration_ids(model_dir, calib, DEFAULT_SAMPLES, DEFAULT_SEQ_LEN)
    model = sn.load_model(model_dir)
    names = [m.name for g in groups for m in g.members]
    imp = sn.importance(model, names, ids)["imp"]
    scale_dtype = getattr(torch, dtype)
    res = {}
    for label, sample in (("full", None), ("sampled", sn.SAMPLE_VALUES)):
        t0, c0 = time.perf_counter(), time.process_time()
        res[label] = sn.proxy_errors(model, groups, options, imp, scale_dtype, sample=sample)
        print(f"{label} proxy: {time.perf_counter() - t0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU")  # fmt: skip
    (full, _), (part, se) = res["full"], res["sampled"]
    pairs = [(g, s) for g in full for s in full[g] if s != "float"]
    a = [full[g][s] for g, s in pairs]
    b = [part[g][s] for g, s in pairs]
    rel = np.array([abs(y / x - 1) for x, y in zip(a, b, strict=True) if x > 0])
    bars = np.array([se[g][s] for g, s in pairs])
    print(
        f"Spearman sampled vs full over {len(pairs)} group × scheme pairs: {spearman(a, b):.4f}; "
        f"|sampled − full| / full median {100 * np.median(rel):.2f} %, max "
        f"{100 * rel.max():.2f} %; stated error bar median {100 * np.median(bars):.2f} %"
    )
    worst = sorted(pairs, key=lambda p: -abs(part[p[0]][p[1]] / max(full[p[0]][p[1]], 1e-30) - 1))
    for g, s in worst[:5]:
        print(f"  {g:40s} {s:7s} sampled/full {part[g][s] / full[g][s]:.3f}, stated error bar "
              f"{100 * se[g][s]:.1f} %")  # fmt: skip


if __name__ == "__main__":
    main()
