"""gguf:auto on the embedded default against every llama.cpp type and stock mix, by size and KLD.

    .venv/bin/python bench/auto.py [--work DIR] [--chunks 20] [--rank 24] [--plot auto.png]

The protocol of bench/quality.py: importance matrix from tinystories_train_head.txt (ctx 512, 20
chunks), every file scored in llama.cpp on the first 20 chunks of wiki.test.raw (ctx 512,
llama-perplexity's chunking, flash attention on), mean KLD and top-1 against the F16 file.
Calibration and evaluation texts are disjoint; nothing is tuned on the evaluation text.

1. every quantized llama.cpp file type (stock mixes included) with the same importance matrix;
2. the sensitivity pass (in a child process: its time and peak RSS), then ``gguf:auto:size=``
   at the exact byte size of stock Q4_K_M and of stock Q3_K_M (and any ``--budgets``);
3. one validation of the F16 file against itself (child process, same text): the cost the
   sensitivity pass is compared with;
4. scores, the acceptance check (auto's KLD ≥ 15 % below every file that fits its budget), the
   size–KLD chart with the Pareto front;
5. with ``--rank N``: N tensor × type pairs, each quantized alone and measured in llama.cpp on
   calibration chunks, against the proxy's prediction — Spearman rank correlation.

``--sample-check`` (alone: the F16 file, the matrix and two stock files are all it makes) times
the sampled sensitivity pass against the full one (every row of every tensor, in the same
process and threads), prints the Spearman rank correlation of the two over every tensor × type
pair, how often the full value lies within the sampled one's stated error bar, and the plans
both make at the byte sizes of stock Q4_K_M and Q3_K_M (predicted bytes, predicted KLD, and the
sampled plan's KLD as the full measurement predicts it).

``--stand-in-imatrix CKPT OUT``: writes a stand-in importance matrix for a Llama/Qwen2-shaped
checkpoint from its config alone (random column statistics, seeded; for timing gguf:auto on a
random-weight checkpoint of a real shape, where a collected matrix would mean nothing either).

Files and the sensitivity cache are kept in --work so that a rerun only redoes what is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"
CALIB = FIXTURES / "tinystories" / "tinystories_train_head.txt"
WIKI = FIXTURES / "wikitext-2-raw" / "wiki.test.raw"


def set_fixtures(folder: Path) -> None:
    global CALIB, WIKI
    CALIB = folder / "tinystories" / "tinystories_train_head.txt"
    WIKI = folder / "wikitext-2-raw" / "wiki.test.raw"


def child(code: str, env: dict[str, str]) -> tuple[float, float, str]:
    """Run ``code`` in a fresh interpreter: (wall seconds, peak RSS MiB, stdout)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, env={**os.environ, **env}, text=True
    )
    out = p.stdout.read() if p.stdout else ""
    _, status, ru = os.wait4(p.pid, 0)
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode:
        raise SystemExit(f"child failed ({p.returncode}):\n{code}")
    return time.perf_counter() - t0, ru.ru_maxrss / 1024, out


SENS = """
import json
from pathlib import Path
from quantkit.convert.hf_to_gguf import QuantSettings, _calib_chunks, with_imatrix
from quantkit.checkpoint import Checkpoint
from quantkit.quantize.gguf.auto import sizes
from quantkit.quantize.gguf.auto.build import _options
from quantkit.quantize.gguf.auto.sensitivity import measure
from quantkit.quantize.gguf.quantizer import QuantizeOptions
from quantkit.quantize.gguf.imatrix import load_imatrix
w = Path({work!r})
im = load_imatrix(w / "im.gguf")
o = _options(with_imatrix(QuantizeOptions(threads={threads}), im, w / "im.gguf"))
slots = sizes.slots(w / "m-F16.gguf", set(o.imatrix), None)
chunks = _calib_chunks(w / "m-F16.gguf", QuantSettings(calib=Path({calib!r}), calib_ctx={ctx}))
s = measure(w / "m-F16.gguf", slots, o, probe_chunks=chunks, n_ctx={ctx}, threads={threads},
            checkpoint=Checkpoint.open({model!r}))
n = sum(len(v) for v in s.errors.values())
print(json.dumps({{"hit": s.cache_hit, "seconds": s.seconds, "pairs": n, "tensors": len(s.errors),
                  "gains": s.gains}}))
"""

VALIDATE_ONE = """
from pathlib import Path
from quantkit.text import read_text
from quantkit.validate.quality import llama_tokens, score_files
w = Path({work!r})
wiki = read_text(Path({wiki!r}))
tokens, bos = llama_tokens(w / "m-F16.gguf", wiki[:200_000], n_ctx={ctx})
score_files([w / "m-F16.gguf"], tokens, n_ctx={ctx}, n_chunks={chunks}, bos=bos,
            reference=w / "m-F16.gguf", threads={threads})
"""


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--work", type=Path, default=Path("bench-auto"))
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--budgets", default="", help="more gguf:auto sizes, comma-separated bytes")
    ap.add_argument("--rank", type=int, default=0, help="tensor × type pairs for the rank check")
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--skip-cost", action="store_true", help="no child-process timing")
    ap.add_argument("--fixtures", type=Path, default=FIXTURES, help="the shared fixtures folder")
    ap.add_argument("--model", type=Path, default=None,
                    help="HF checkpoint (default: the embedded default; bench/offgrid.py makes a "
                    "float-like copy of it)")  # fmt: skip
    ap.add_argument("--stock", default="", help="only these stock file types, comma-separated")
    ap.add_argument(
        "--sample-check",
        action="store_true",
        help="only the sampled-vs-full sensitivity comparison",
    )
    ap.add_argument(
        "--samples",
        default="",
        help="values per tensor for --sample-check, comma-separated (default: the pass's own)",
    )
    ap.add_argument(
        "--probes",
        action="store_true",
        help="--sample-check: measure the per-kind gains in llama.cpp too "
        "(else both passes rank by the raw weighted error)",
    )
    ap.add_argument("--types", default="",
                    help="--sample-check: candidate types (default: gguf:auto's)")  # fmt: skip
    ap.add_argument("--stand-in-imatrix", nargs=2, type=Path, metavar=("CKPT", "OUT"))
    args = ap.parse_args()
    if args.stand_in_imatrix:
        stand_in_imatrix(*args.stand_in_imatrix)
        return
    set_fixtures(args.fixtures)
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  # progress in logs

    from quantkit.convert import QuantSettings, convert
    from quantkit.demo import demo_model
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.quantize.gguf.quantizer import QuantizeOptions
    from quantkit.quantize.gguf.types import GGUF_TYPES
    from quantkit.text import read_text
    from quantkit.validate.quality import llama_tokens, score_files

    w = args.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    env = {"QUANTKIT_CACHE": str(w / "cache")}
    os.environ.update(env)
    model = args.model or demo_model()
    from quantkit.checkpoint import Checkpoint

    ckpt = Checkpoint.open(model)  # the Fisher weights of the sensitivity pass
    f16 = w / "m-F16.gguf"
    if not f16.exists():
        convert(model, ["gguf:F16"], f16)
    if not (w / "im.gguf").exists():
        im = collect_imatrix(
            model, read_text(CALIB), ctx=args.ctx, chunks=args.calib_chunks, threads=args.threads
        )
        save_imatrix(im, w / "im.gguf")
    qs = QuantSettings(options=QuantizeOptions(threads=args.threads), imatrix_file=w / "im.gguf")
    stock = [n for n, t in GGUF_TYPES.items() if t.quantized]
    if args.stock:
        stock = sorted({"Q4_K_M", "Q3_K_M", *args.stock.split(",")}, key=stock.index)
    if args.sample_check:
        stock = ["Q4_K_M", "Q3_K_M"]
    (w / "stock").mkdir(exist_ok=True)
    from quantkit.errors import EngineError

    for name in stock:
        if not (w / "stock" / f"m-{name}.gguf").exists():
            try:
                convert(f16, [f"gguf:{name}"], w / "stock", quant=qs)
            except EngineError as e:  # a type with no fallback for this model's row widths
                print(f"stock {name}: not written ({e.message.splitlines()[0][:160]})")
    files = {
        n: w / "stock" / f"m-{n}.gguf" for n in stock if (w / "stock" / f"m-{n}.gguf").exists()
    }
    if args.sample_check:
        sample_check(w, f16, qs, args, {n: files[n].stat().st_size for n in stock})
        return

    cost: dict[str, tuple[float, float]] = {}
    if not args.skip_cost:
        fmt = dict(work=str(w), calib=str(CALIB), wiki=str(WIKI), ctx=args.ctx,
                   chunks=args.chunks, threads=args.threads, model=str(model))  # fmt: skip
        s, rss, out = child(SENS.format(**fmt), env)
        info = json.loads(out.strip().splitlines()[-1])
        cost["sensitivity"] = (s, rss)
        if info["hit"]:
            print("note: sensitivity came from the cache; delete --work/cache to time it")
        s2, rss2, _ = child(VALIDATE_ONE.format(**fmt), env)
        cost["validation"] = (s2, rss2)
        print(
            f"sensitivity pass: {s:.1f} s wall (proxy {info['seconds']['proxy']:.1f} s, "
            f"llama.cpp probes {info['seconds']['probe']:.1f} s), peak RSS {rss:.0f} MiB; "
            f"{info['tensors']} tensors, {info['pairs']} tensor×type pairs "
            f"({1000 * info['seconds']['proxy'] / info['pairs']:.0f} ms per pair)"
        )
        print(
            f"one validation (F16 vs itself, {args.chunks}×{args.ctx} tokens): {s2:.1f} s, "
            f"peak RSS {rss2:.0f} MiB → ratio time {s / s2:.2f}, memory {rss / rss2:.2f}"
        )

    budgets = {
        "Q4_K_M": files["Q4_K_M"].stat().st_size,
        "Q3_K_M": files["Q3_K_M"].stat().st_size,
    }
    for b in filter(None, args.budgets.split(",")):
        budgets[f"{int(b)}B"] = int(b)
    qs_auto = QuantSettings(
        options=QuantizeOptions(threads=args.threads), calib=CALIB, calib_ctx=args.ctx
    )
    autos: dict[str, Path] = {}
    plans: dict[str, dict] = {}
    for label, size in budgets.items():
        out = w / "auto" / f"m-auto-{label}.gguf"
        out.parent.mkdir(exist_ok=True)
        # the auto target needs the matrix as a file and the text for the probes
        from quantkit.convert.hf_to_gguf import _auto_one, with_imatrix
        from quantkit.quantize.gguf.auto.spec import AutoSpec
        from quantkit.quantize.gguf.imatrix import load_imatrix

        opts = with_imatrix(qs.options, load_imatrix(w / "im.gguf"), w / "im.gguf")
        if out.exists():
            out.unlink()
        art = _auto_one(f16, AutoSpec(size=size), out, opts, qs_auto, force=True, dry_run=False,
                        threads=args.threads, progress=None, checkpoint=ckpt)  # fmt: skip
        autos[f"auto@{label}"] = out
        plans[f"auto@{label}"] = art.auto or {}
        sel = (art.auto or {}).get("selection") or {}
        if sel.get("winner"):
            print(f"selection at {label} on {sel['chunks']} held-out calibration chunks "
                  f"({sel['seconds']:.0f} s): winner {sel['winner']}, margin over the best "
                  f"stock measured ({sel['best_reference']}) {100 * (sel['margin'] or 0):+.1f} %")  # fmt: skip
            for c in sel["candidates"]:
                m = "—" if c["measured_kld"] is None else f"{c['measured_kld']:.5f}"
                p = "—" if c["predicted_kld"] is None else f"{c['predicted_kld']:.5f}"
                print(f"  {c['name']:<14} {c['source']:<6} {c['bytes']:>12,} B predicted {p:>8}"
                      f" measured {m}")  # fmt: skip
            autos.update(solver_files(f16, size, opts, qs_auto, w / "auto", label, sel, ckpt))
        print(
            f"auto at {label} ({size:,} B): wrote {art.size:,} B (predicted "
            f"{art.auto['predicted_bytes']:,}), predicted KLD {art.auto['predicted_kld']:.4f}, "
            f"types {art.auto['histogram']}"
        )

    wiki = read_text(WIKI)
    tokens, bos = llama_tokens(
        f16, wiki[: max(200_000, args.chunks * args.ctx * 8)], n_ctx=args.ctx
    )
    all_files = {**files, **autos}
    res_path = w / "scores.json"
    scores = json.loads(res_path.read_text()) if res_path.exists() else {}
    todo = [n for n in all_files if n not in scores or "@" in n]
    t0 = time.perf_counter()
    res = score_files([all_files[n] for n in todo], tokens, n_ctx=args.ctx, n_chunks=args.chunks,
                      bos=bos, reference=f16, threads=args.threads)  # fmt: skip
    for n in todo:
        acc = res[str(all_files[n])]
        k = acc.kld_stats()
        scores[n] = {"bytes": all_files[n].stat().st_size, "kld": k["mean"], "top1": k["top1"],
                     "ppl": acc.ppl()[0]}  # fmt: skip
    res_path.write_text(json.dumps(scores, indent=1))
    print(f"scored {len(todo)} files in {time.perf_counter() - t0:.0f} s\n")

    print(f"{'file':<16} {'bytes':>12} {'mean KLD':>10} {'top-1':>7} {'PPL':>8}")
    for n, s in sorted(scores.items(), key=lambda kv: -kv[1]["bytes"]):
        print(
            f"{n:<16} {s['bytes']:>12,} {s['kld']:>10.5f} {100 * s['top1']:>6.2f}% {s['ppl']:>8.3f}"
        )
    print()
    for label in budgets:
        a = scores[f"auto@{label}"]
        fits = {n: s for n, s in scores.items() if "@" not in n and s["bytes"] <= budgets[label]}
        best_n = min(fits, key=lambda n: fits[n]["kld"])
        gain = 1 - a["kld"] / fits[best_n]["kld"]
        verdict = "PASS" if gain >= 0.15 else "not reached"
        print(
            f"budget {label} {budgets[label]:,} B: auto {a['bytes']:,} B KLD {a['kld']:.5f}; best "
            f"fitting stock {best_n} {fits[best_n]['bytes']:,} B KLD {fits[best_n]['kld']:.5f} → "
            f"{100 * gain:.1f} % lower ({verdict} the 15 % bar)"
        )
    if args.plot:
        from quantkit.validate.report import size_kld_chart

        size_kld_chart(
            [
                (n, s["bytes"], s["kld"], n.startswith("auto@"))
                for n, s in scores.items()
                if "@" not in n or n.startswith("auto@")
            ],
            args.plot,
            f"SmolLM2-135M-Instruct: mean KLD vs F16 on wiki.test.raw ({args.chunks}×{args.ctx})",
        )
        print(f"chart: {args.plot}")
    if args.rank:
        rank_check(w, f16, qs, args, ckpt)


def solver_files(f16: Path, size: int, opts, qs, folder: Path, label: str, sel: dict, ckpt) -> dict:
    """The solver candidates the selection did not ship, written too, so that the evaluation
    text shows how the choice on held-out calibration chunks carries over."""
    from quantkit.convert.hf_to_gguf import _calib_chunks
    from quantkit.quantize.gguf.auto.build import candidates, plan_auto, write_auto
    from quantkit.quantize.gguf.auto.spec import AutoSpec

    chunks = _calib_chunks(f16, qs)  # the same probes: the sensitivity comes from the cache
    plan = plan_auto(f16, AutoSpec(size=size), opts, probe_chunks=chunks, n_ctx=qs.calib_ctx,
                     checkpoint=ckpt)  # fmt: skip
    _, plans = candidates(f16, plan, opts)
    out = {}
    for c in sel["candidates"]:
        if c["source"] != "solver" or c["name"] == sel["winner"]:
            continue
        # "cand-": the shipped file is m-auto-LABEL.gguf, which candidate "auto" would overwrite
        path = folder / f"m-cand-{c['name'].replace(':', '-')}-{label}.gguf"
        write_auto(f16, plans[c["name"]], path, opts)
        out[f"{c['name']}@{label}"] = path
    return out


def rank_check(w: Path, f16: Path, qs, args, ckpt) -> None:
    """Single tensor × type pairs measured in llama.cpp vs the proxy (Spearman)."""

    from quantkit.convert.hf_to_gguf import QuantSettings, _calib_chunks, with_imatrix
    from quantkit.quantize.gguf.auto import sizes
    from quantkit.quantize.gguf.auto.build import _options
    from quantkit.quantize.gguf.auto.probe import KLDProbe
    from quantkit.quantize.gguf.auto.sensitivity import measure
    from quantkit.quantize.gguf.imatrix import load_imatrix

    o = _options(with_imatrix(qs.options, load_imatrix(w / "im.gguf"), w / "im.gguf"))
    slots = sizes.slots(f16, set(o.imatrix or {}), None)
    chunks = _calib_chunks(f16, QuantSettings(calib=CALIB, calib_ctx=args.ctx))
    sens = measure(f16, slots, o, probe_chunks=chunks, n_ctx=args.ctx, threads=args.threads,
                   checkpoint=ckpt)  # fmt: skip
    rng = random.Random(0)
    pool = [(s, t) for s in slots if s.quantizable for t in s.options if t != "F16"]
    sample = rng.sample(pool, args.rank)
    # the measurements depend on the files and chunks alone: kept from an earlier run
    old = json.loads((w / "rank.json").read_text()) if (w / "rank.json").exists() else []
    done = {(r[0], r[1]): r[2] for r in old}
    probe = KLDProbe(f16, chunks or [], o, threads=args.threads, n_ctx=args.ctx)
    per_kind = sens.per_kind()
    rows = []
    for s, t in sample:
        kld = done.get((s.name, t)) or probe.kld({s.name: t})
        raw = per_kind.errors[s.name][t]
        rows.append((s.name, t, kld, sens.kld(s, t), raw, per_kind.kld(s, t)))
        print(f"  {s.name:<28} {t:<8} measured {kld:.3e} predicted {rows[-1][3]:.3e}", flush=True)

    m = [r[2] for r in rows]
    gains = "per-kind gains on Fisher-weighted errors" if sens.weighting == "fisher" else (
        "kind × layer gains")  # fmt: skip
    print(
        f"rank correlation over {len(rows)} tensor×type pairs (calibration chunks): "
        f"Spearman {spearman(m, [r[3] for r in rows]):.3f} with {gains}, "
        f"{spearman(m, [r[5] for r in rows]):.3f} with per-kind gains on the imatrix-weighted "
        f"error alone, {spearman(m, [r[4] for r in rows]):.3f} raw imatrix-weighted error"
    )
    if sens.weighting == "fisher":
        ratio = sorted((r[3] / r[2], r[0], r[1]) for r in rows)
        within = sum(0.5 <= x <= 2 for x, _, _ in ratio) / len(ratio)
        print(f"predicted / measured: {100 * within:.0f} % within 2×; lowest "
              f"{', '.join(f'{n} {t} {x:.2f}' for x, n, t in ratio[:2])}; highest "
              f"{', '.join(f'{n} {t} {x:.2f}' for x, n, t in ratio[-2:])}")  # fmt: skip
    (w / "rank.json").write_text(json.dumps(rows, indent=1))


def stand_in_imatrix(ckpt: Path, out: Path) -> None:
    """Random per-column statistics for every Linear llama.cpp weighs (no model run)."""
    import numpy as np

    from quantkit.quantize.gguf.imatrix import Imatrix, save_imatrix

    cfg = json.loads((ckpt / "config.json").read_text())
    h, f = cfg["hidden_size"], cfg["intermediate_size"]
    rng = np.random.default_rng(0)
    tokens = 512
    entries = {}
    for i in range(cfg["num_hidden_layers"]):
        for kind, cols in (("attn_q", h), ("attn_k", h), ("attn_v", h), ("attn_output", h),
                           ("ffn_gate", h), ("ffn_up", h), ("ffn_down", f)):  # fmt: skip
            mean_sq = rng.uniform(0.5, 1.5, cols).astype(np.float32)
            entries[f"blk.{i}.{kind}.weight"] = (mean_sq * tokens, np.array([tokens]))
    save_imatrix(Imatrix(entries, chunks=1, dataset="stand-in", chunk_size=tokens), out)
    print(f"{out}: {len(entries)} tensors (stand-in statistics)")


def spearman(a, b) -> float:
    import numpy as np

    ra = np.argsort(np.argsort(a))
    rb = np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def sample_check(w: Path, f16: Path, qs, args, budgets: dict[str, int]) -> None:
    """Sampled sensitivity pass against the full one: time, rank correlation, error bars, plans."""
    from dataclasses import replace

    import numpy as np

    from quantkit.convert.hf_to_gguf import QuantSettings, _calib_chunks, with_imatrix
    from quantkit.quantize.gguf.auto import sensitivity as S
    from quantkit.quantize.gguf.auto import sizes
    from quantkit.quantize.gguf.auto.build import _options, plan_auto
    from quantkit.quantize.gguf.auto.spec import AutoSpec
    from quantkit.quantize.gguf.imatrix import load_imatrix

    o = _options(with_imatrix(qs.options, load_imatrix(w / "im.gguf"), w / "im.gguf"))
    types = tuple(t for t in args.types.split(",") if t) or None
    slots = sizes.slots(f16, set(o.imatrix or {}), types)
    n_params = sum(s.n_elements for s in slots)
    chunks = (
        _calib_chunks(f16, QuantSettings(calib=CALIB, calib_ctx=args.ctx)) if args.probes else None
    )
    print(f"load: {os.getloadavg()[0]:.2f} (1 min), threads {args.threads}")
    cpu0 = time.process_time()
    # the full pass with its llama.cpp probes (cached in --work after the first run)
    t0 = time.perf_counter()
    full = S.measure(f16, slots, o, probe_chunks=chunks, n_ctx=args.ctx, threads=args.threads,
                     sample=None)  # fmt: skip
    cpu_full = time.process_time() - cpu0
    print(
        f"full pass: proxy {full.seconds['proxy']:.1f} s, probes {full.seconds['probe']:.1f} s"
        f" (process CPU {cpu_full:.0f} s)"
        + (" (from the cache: measured in an earlier run)" if full.cache_hit else "")
        + f"; {len(full.errors)} tensors, {sum(len(v) for v in full.errors.values())} pairs, "
        f"{n_params:,} parameters"
    )
    pairs = [(n, t) for n, v in full.errors.items() for t in v]
    f_err = np.array([full.errors[n][t] for n, t in pairs])
    kinds = {s.name: s.kind for s in slots}
    f_kld = np.array([full.gains.get(kinds[n], 1.0) * full.errors[n][t] for n, t in pairs])
    samples = [int(x) for x in args.samples.split(",") if x] or [S.SAMPLE_VALUES]
    by_slot = {s.name: s for s in slots}
    for sample in samples:
        t0, c0 = time.perf_counter(), time.process_time()
        errors, rel_se, _ = S.proxy_errors(f16, slots, o.imatrix or {}, threads=args.threads,
                                        sample=sample)  # fmt: skip
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        values = sum(
            S.rows_for(by_slot[n].ncols, by_slot[n].nrows, sample) * by_slot[n].ncols
            * len(errors[n]) for n in errors
        )  # fmt: skip
        full_values = sum(by_slot[n].n_elements * len(errors[n]) for n in errors)
        s_err = np.array([errors[n][t] for n, t in pairs])
        se = np.array([rel_se[n][t] for n, t in pairs])
        # the per-kind gains from the same probes (KLD measured once), over the sampled errors
        gains = {}
        for kind, g in full.gains.items():
            t_probe = next(
                (t for t in S.PROBE_ORDER
                 if all(t in errors[s.name] for s in slots if s.quantizable and s.kind == kind)),
                None,
            )  # fmt: skip
            err = sum(errors[s.name][t_probe] for s in slots if s.quantizable and s.kind == kind)
            gains[kind] = full.probe_kld[kind] / err if err > 0 else g
        s_kld = np.array([gains.get(kinds[n], 1.0) * errors[n][t] for n, t in pairs])
        rel = np.abs(s_err - f_err) / np.maximum(f_err, 1e-30)
        sampled = se > 0
        within = np.abs(s_err - f_err) <= 2 * se * s_err
        print(
            f"\nsampled pass, {sample:,} values per tensor: proxy {dt:.1f} s (CPU {cpu:.0f} s) "
            f"(full proxy {full.seconds['proxy']:.1f} s → {full.seconds['proxy'] / dt:.1f}× "
            f"faster); {values:,} of {full_values:,} quantized values ({full_values / values:.1f}×)"
        )
        print(
            f"  Spearman vs full over {len(pairs)} tensor × type pairs: raw error "
            f"{spearman(f_err, s_err):.4f}, predicted KLD {spearman(f_kld, s_kld):.4f}"
        )
        if sampled.any():
            print(
                f"  sampled pairs {int(sampled.sum())}: |sampled − full| / full median "
                f"{100 * np.median(rel[sampled]):.2f} %, 95th pct "
                f"{100 * np.quantile(rel[sampled], 0.95):.2f} %, max {100 * rel[sampled].max():.2f} %;"
                f" stated error bar (1 SE) median {100 * np.median(se[sampled]):.2f} %, 95th pct "
                f"{100 * np.quantile(se[sampled], 0.95):.2f} %; full within 2 SE: "
                f"{100 * within[sampled].mean():.1f} %"
            )
        sens_s = replace(full, errors=errors, gains=gains, rel_se=rel_se, sample=sample)
        for label, size in budgets.items():
            pf = plan_auto(f16, AutoSpec(size=size, types=types), o, sensitivity=full)
            ps = plan_auto(f16, AutoSpec(size=size, types=types), o, sensitivity=sens_s)
            true_s = sum(full.kld(by_slot[n], t) for n, t in ps.types.items())
            same = sum(ps.types[n] == pf.types[n] for n in pf.types)
            print(
                f"  plan at stock {label} bytes ({size:,}): full → {pf.file_bytes:,} B, predicted "
                f"KLD {pf.predicted_kld:.4g}; sampled → {ps.file_bytes:,} B, predicted "
                f"{ps.predicted_kld:.4g} (full measurement of that plan: {true_s:.4g}, "
                f"{100 * (true_s / pf.predicted_kld - 1):+.2f} %); same type for "
                f"{same}/{len(pf.types)} tensors"
            )


if __name__ == "__main__":
    main()
