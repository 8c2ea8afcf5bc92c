"""gguf:auto beside llama.cpp's stock types and other mixed-precision GGUF quantizers, by KLD.

    bench/peers/setup.sh                       # the peers' own envs, once
    .venv/bin/python bench/peers/run.py MODEL [--work DIR] [--json rows.json] [--plot chart.png]

MODEL is a Hugging Face checkpoint folder. The protocol of bench/quality.py and bench/auto.py:
an importance matrix from tinystories_train_head.txt (ctx 512, 20 chunks), every file scored in
llama.cpp (quantkit's scoring: llama-cpp-python, llama-perplexity's chunking, flash attention on)
on the first 20 chunks × 512 tokens of wiki.test.raw, mean KLD and top-1 agreement against the
model's own F16 GGUF. Calibration and evaluation texts are disjoint.

Rows:
1. llama.cpp's stock file types and mixes, written by ``quantkit convert --to gguf:TYPE
   --imatrix`` with that one matrix (``--types``);
2. ``gguf:auto:size=`` at the exact byte size of stock Q4_K_M and of stock Q3_K_M (``--budgets``
   names the stock files), through quantkit's CLI; rerun every time, so a run after a change to
   gguf:auto refreshes them (the row records the quantkit commit that wrote the file);
3. peers, each in its own env (bench/peers/setup.sh) and scored by the same code as the rest:
   AutoRound's AutoScheme (``avg_bits`` = the bits per weight stock spends on the transformer
   blocks' linear layers at that budget, GGUF export), and PrismaQuant's GGUF lane. A peer that
   cannot run here gets a row with its version and the exact error instead of figures; one that
   misses the byte budget is reported at its own bytes (the chart places it).

Everything is kept in --work, so a rerun only redoes what is missing (and the gguf:auto rows).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
FIXTURES = REPO.parent / "shared" / "fixtures"
STOCK = ("Q8_0,Q6_K,Q5_K_M,Q5_K_S,Q5_1,Q5_0,Q4_K_M,Q4_K_S,Q4_1,Q4_0,IQ4_NL,IQ4_XS,"
         "Q3_K_L,Q3_K_M,Q3_K_S,IQ3_M,IQ3_S,Q2_K")  # fmt: skip
PEER_ENVS = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "quantkit" / "envs"


def sh(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` with its output streamed to ``log`` (long peer runs can be followed there);
    the output also comes back in ``stdout`` so that a failure can be quoted."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as f:
        f.write(f"$ {' '.join(cmd)}\n")
        f.flush()
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})}).returncode  # fmt: skip
    text = log.read_text(errors="replace")
    return subprocess.CompletedProcess(cmd, rc, stdout=text, stderr="")


def quantkit_cli() -> str:
    exe = Path(sys.executable).parent / "quantkit"
    return str(exe) if exe.exists() else "quantkit"


def quantkit_commit() -> str:
    """The commit of the quantkit that runs (where it is a git checkout), dirty marked."""
    import quantkit

    src = Path(quantkit.__file__).resolve().parents[1]
    try:
        rev = subprocess.run(["git", "-C", str(src), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(src), "status", "--porcelain", "--", "quantize",
                                "convert", "quantkit"], capture_output=True, text=True).stdout  # fmt: skip
        return rev + ("+dirty" if dirty.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def tail(text: str, lines: int = 6) -> str:
    return "\n".join([x for x in text.strip().splitlines() if x.strip()][-lines:])


def block_bpw(path: Path) -> float:
    """Bits per weight a GGUF spends on its transformer blocks' matrices (norms left out)."""
    import gguf

    r = gguf.GGUFReader(path)
    ts = [t for t in r.tensors if t.name.startswith("blk.") and len(t.shape) > 1 and t.shape[1] > 1]
    return sum(int(t.n_bytes) for t in ts) * 8 / sum(int(t.n_elements) for t in ts)


def pip_version(python: Path, dist: str) -> str:
    p = subprocess.run([str(python), "-c", f"import importlib.metadata as m; print(m.version({dist!r}))"],
                       capture_output=True, text=True)  # fmt: skip
    return p.stdout.strip() or "not installed"


def run_autoround(args, w: Path, label: str, stock_file: Path, calib: Path) -> dict:
    """AutoScheme at the bits stock spends on the blocks at this budget; its GGUF, or the error."""
    py = args.peer_envs / "peer-autoround" / "bin" / "python"
    row: dict = {"name": f"AutoRound AutoScheme @{label}", "kind": "peer", "peer": "auto-round"}
    if not py.exists():
        return {**row, "status": "not set up", "error": f"{py} missing: run bench/peers/setup.sh"}
    row["version"] = pip_version(py, "auto-round")
    bits = round(block_bpw(stock_file), 3)
    row["avg_bits"] = bits
    row["scheme_nsamples"] = args.scheme_nsamples
    row["opt_rtn"] = not args.autoround_plain_rtn
    d = w / "peers" / f"autoround-{label}"
    out = w / "peers" / f"autoround-{label}.gguf"
    meta = d / "result.json"
    if not out.exists():
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
        print(f"  AutoRound AutoScheme avg_bits={bits} (stock {label}'s blocks) ...", flush=True)
        t0 = time.perf_counter()
        # offline: AutoRound falls back to downloading a calibration set when its own fails
        p = sh([str(py), str(HERE / "peer_autoround.py"), str(args.model), "--avg-bits", str(bits),
                "--calib", str(calib), "--out", str(d / "out"), "--nsamples",
                str(args.calib_chunks), "--seqlen", str(args.ctx), "--scheme-nsamples",
                str(args.scheme_nsamples), "--calib-json", str(w / "peers" / "autoround-calib.json"),
                *(["--disable-opt-rtn"] if args.autoround_plain_rtn else [])],
               d / "log.txt",
               env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})  # fmt: skip
        files = sorted((d / "out").rglob("*.gguf"))
        if p.returncode or not files:
            return {**row, "status": "failed", "error": tail(p.stderr or p.stdout),
                    "log": str(d / "log.txt")}  # fmt: skip
        info = json.loads([x for x in p.stdout.splitlines() if x.startswith('{"files"')][-1])
        info["wall_s"] = time.perf_counter() - t0
        meta.write_text(json.dumps(info, indent=1))
        shutil.copyfile(files[0], out)
    info = json.loads(meta.read_text()) if meta.exists() else {}
    return {**row, "status": "ok", "path": str(out), "seconds": info.get("wall_s"),
            "layer_types": info.get("layer_types")}  # fmt: skip


def run_prismaquant(args, w: Path, label: str, stock_file: Path, calib: Path) -> dict:
    """PrismaQuant's own pipeline, GGUF lane, at the stock file's bytes; its GGUF or the error."""
    env_dir = args.peer_envs / "peer-prismaquant"
    py = env_dir / "bin" / "python"
    row: dict = {"name": f"PrismaQuant GGUF @{label}", "kind": "peer", "peer": "prismaquant"}
    if not py.exists():
        return {**row, "status": "not set up", "error": f"{py} missing: run bench/peers/setup.sh"}
    row["version"] = pip_version(py, "prismaquant")
    script = subprocess.run([str(py), "-c", "import prismaquant, pathlib; print(pathlib.Path("
                             "prismaquant.__file__).parent / 'run-pipeline.sh')"],
                            capture_output=True, text=True).stdout.strip()  # fmt: skip
    d = w / "peers" / f"prismaquant-{label}"
    out = d / "work" / "exported.gguf"
    failed = d / "failed.json"
    if failed.exists() and not args.retry_peers:  # its refusal, recorded by an earlier run
        return {**row, **json.loads(failed.read_text())}
    if not out.exists():
        d.mkdir(parents=True, exist_ok=True)
        # the pipeline's documented knobs: the GGUF lane (no production cache: its exporter
        # requantizes a bf16 skeleton), a byte budget, this host's device, our calibration text
        env = {"PATH": f"{env_dir / 'bin'}:{os.environ['PATH']}", "MODEL_PATH": str(args.model),
               "WORK_DIR": str(d / "work"), "EXPORT_CONTAINER": "gguf", "TARGET_PROFILE": "gguf",
               "PRODUCTION_CACHE": "0", "PRODUCTION_RECACHE": "0",
               "TARGET_DISK_GB": f"{stock_file.stat().st_size / 1e9:.6f}",
               "DEVICE": args.prismaquant_device, "EXPORT_DEVICE": args.prismaquant_device,
               "NSAMPLES": str(args.calib_chunks), "SEQLEN": str(args.ctx), "DATASET": str(calib),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # fmt: skip
        print(f"  PrismaQuant GGUF lane at {stock_file.stat().st_size:,} B ...", flush=True)
        p = sh(["bash", script], d / "log.txt", env=env)
        if p.returncode or not out.exists():
            why = {"status": "does not run here", "error": tail(p.stderr or p.stdout, 4),
                   "log": str(d / "log.txt"), "version": row["version"]}  # fmt: skip
            failed.write_text(json.dumps(why))
            return {**row, **why}
    return {**row, "status": "ok", "path": str(out)}


PEERS = {"autoround": run_autoround, "prismaquant": run_prismaquant}


def host() -> dict:
    from quantkit import host as h

    flags = h.cpu_flags()
    simd = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile") if f in flags]
    return {"cpu": h.cpu_model(), "simd": simd, "cores": os.cpu_count(),
            "python": platform.python_version()}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("model", type=Path, help="Hugging Face checkpoint folder")
    ap.add_argument("--work", type=Path, default=Path("bench-peers"))
    ap.add_argument("--fixtures", type=Path, default=FIXTURES)
    ap.add_argument("--types", default=STOCK, help="stock llama.cpp types, comma-separated")
    ap.add_argument(
        "--budgets", default="Q4_K_M,Q3_K_M", help="stock files whose bytes are budgets"
    )
    ap.add_argument("--peers", default="autoround,prismaquant")
    ap.add_argument("--peer-envs", type=Path, default=PEER_ENVS)
    ap.add_argument("--prismaquant-device", default="cpu")
    ap.add_argument(
        "--steps",
        default="auto,peers,score",
        help="what to run beyond the F16 file, matrix and stock files (e.g. peers alone)",
    )
    ap.add_argument(
        "--scheme-nsamples",
        type=int,
        default=16,
        help="AutoRound: samples AutoScheme scores its options on (its default: 16)",
    )
    ap.add_argument(
        "--autoround-plain-rtn",
        action="store_true",
        help="AutoRound: plain RTN after AutoScheme (its default imatrix-optimized RTN is slower)",
    )
    ap.add_argument("--retry-peers", action="store_true", help="rerun peers that failed before")
    ap.add_argument("--keep-auto", action="store_true", help="reuse gguf:auto files already made")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, help="rows (default: WORK/rows.json)")
    ap.add_argument("--plot", type=Path, help="size–KLD chart PNG (needs matplotlib)")
    ap.add_argument("--md", type=Path, help="the table as Markdown")
    args = ap.parse_args()
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[attr-defined]  # progress in logs
    args.model = args.model.resolve()
    calib = args.fixtures / "tinystories" / "tinystories_train_head.txt"
    wiki = args.fixtures / "wikitext-2-raw" / "wiki.test.raw"
    w = args.work.resolve()
    w.mkdir(parents=True, exist_ok=True)
    q = quantkit_cli()
    commit = quantkit_commit()
    th = ["--threads", str(args.threads)]

    def must(cmd: list[str], log: Path) -> None:
        p = sh(cmd, log)
        if p.returncode:
            raise SystemExit(f"failed: {' '.join(cmd)}\n{tail(p.stderr or p.stdout, 20)}")

    f16 = w / "m-F16.gguf"
    if not f16.exists():
        must(
            [q, "convert", str(args.model), "--to", "gguf:F16", "-o", str(f16)],
            w / "logs" / "f16.txt",
        )
    im = w / "im.gguf"
    if not im.exists():
        print("importance matrix ...", flush=True)
        must([q, "imatrix", str(args.model), "--calib", str(calib), "--ctx", str(args.ctx),
              "--chunks", str(args.calib_chunks), "-o", str(im), *th], w / "logs" / "imatrix.txt")  # fmt: skip
    rows: list[dict] = []
    for t in filter(None, args.types.split(",")):
        out = w / "stock" / f"m-{t}.gguf"
        if not out.exists():
            must([q, "convert", str(f16), "--to", f"gguf:{t}", "--imatrix", str(im), "-o", str(out),
                  *th], w / "logs" / f"stock-{t}.txt")  # fmt: skip
        rows.append({"name": t, "kind": "stock", "status": "ok", "path": str(out)})
    budgets = {b: w / "stock" / f"m-{b}.gguf" for b in filter(None, args.budgets.split(","))}
    steps = set(args.steps.split(","))
    for label, stock_file in budgets.items() if "auto" in steps else ():
        size = stock_file.stat().st_size
        out = w / "auto" / f"m-auto-{label}.gguf"
        log = w / "auto" / f"auto-{label}.json"
        if not (args.keep_auto and out.exists()):
            print(f"gguf:auto:size={size} ({label}) with quantkit {commit} ...", flush=True)
            t0 = time.perf_counter()
            # the matrix weighs each tensor's error; the calibration text is what gguf:auto
            # probes the per-kind KLD gains on (as in bench/auto.py)
            p = sh([q, "convert", str(f16), "--to", f"gguf:auto:size={size}", "--imatrix", str(im),
                    "--calib", str(calib), "--ctx", str(args.ctx), "-o", str(out), "--force",
                    "--json", *th], w / "logs" / f"auto-{label}.txt")  # fmt: skip
            if p.returncode:
                raise SystemExit(f"gguf:auto failed:\n{tail(p.stderr or p.stdout, 20)}")
            log.write_text(json.dumps({"commit": commit, "seconds": time.perf_counter() - t0}))
        made = json.loads(log.read_text()) if log.exists() else {}
        rows.append({"name": f"gguf:auto @{label}", "kind": "auto", "status": "ok",
                     "path": str(out), "budget": size, "commit": made.get("commit", "unknown"),
                     "seconds": made.get("seconds")})  # fmt: skip
    for peer in filter(None, args.peers.split(",")) if "peers" in steps else ():
        for label, stock_file in budgets.items():
            r = PEERS[peer](args, w, label, stock_file, calib)
            r["budget"] = stock_file.stat().st_size
            rows.append(r)
            if r["status"] != "ok":
                print(f"  {r['name']}: {r['status']}: {r['error'].splitlines()[-1][:200]}")

    if "score" not in steps:
        return
    score(rows, w, f16, wiki, args)
    table(rows)
    out_json = args.json or w / "rows.json"
    out_json.write_text(json.dumps({"model": str(args.model), "host": host(), "quantkit": commit,
                                    "protocol": {"ctx": args.ctx, "chunks": args.chunks,
                                                 "calib_chunks": args.calib_chunks,
                                                 "reference": "F16 GGUF"},
                                    "rows": rows}, indent=1))  # fmt: skip
    print(f"\nrows: {out_json}")
    if args.md:
        args.md.write_text(markdown(rows))
        print(f"markdown: {args.md}")
    if args.plot:
        chart(rows, args.plot, f"{args.model.name}: mean KLD vs F16, wiki.test.raw "
              f"{args.chunks}×{args.ctx}, llama.cpp")  # fmt: skip
        print(f"chart: {args.plot}")


def score(rows: list[dict], w: Path, f16: Path, wiki: Path, args) -> None:
    """KLD / top-1 / PPL of every file against F16; cached by path, size and mtime."""
    from quantkit.text import read_text
    from quantkit.validate.quality import llama_tokens, score_files

    cache_p = w / "scores.json"
    cache = json.loads(cache_p.read_text()) if cache_p.exists() else {}

    def key(p: Path) -> str:
        st = p.stat()
        return f"{p}|{st.st_size}|{st.st_mtime_ns}"

    todo = [
        Path(r["path"]) for r in rows if r["status"] == "ok" and key(Path(r["path"])) not in cache
    ]
    if todo:
        text = read_text(wiki)
        tokens, bos = llama_tokens(f16, text[: max(200_000, args.chunks * args.ctx * 8)],
                                   n_ctx=args.ctx)  # fmt: skip
        print(f"scoring {len(todo)} files ...", flush=True)
        # quantkit's own files in one pass (the F16 reference is computed once), the peers' in
        # another; a pass llama.cpp fails is redone file by file, so a file it refuses is
        # reported as such and the rest still score
        ours = [p for p in todo if not p.is_relative_to(w / "peers")]
        theirs = [p for p in todo if p not in ours]
        queue = [g for g in (ours, theirs) if g]
        while queue:
            group = queue.pop(0)
            t0 = time.perf_counter()
            try:
                res = score_files(group, tokens, n_ctx=args.ctx, n_chunks=args.chunks, bos=bos,
                                  reference=f16, threads=args.threads)  # fmt: skip
            except Exception as e:  # llama.cpp refusing a peer's file is a result, not a crash
                if len(group) > 1:
                    queue[:0] = [[p] for p in group]
                else:
                    cache[key(group[0])] = {"error": f"llama.cpp: {type(e).__name__}: {e}"}
                continue
            for p in group:
                k = res[str(p)].kld_stats()
                cache[key(p)] = {"kld": k["mean"], "top1": k["top1"], "ppl": res[str(p)].ppl()[0]}
            cache_p.write_text(json.dumps(cache, indent=1))
            print(f"  {len(group)} file(s) in {time.perf_counter() - t0:.0f} s", flush=True)
        cache_p.write_text(json.dumps(cache, indent=1))
    for r in rows:
        if r["status"] != "ok":
            continue
        p = Path(r["path"])
        r["bytes"] = p.stat().st_size
        r["block_bpw"] = round(block_bpw(p), 3)
        s = cache[key(p)]
        if "error" in s:
            r["status"], r["error"] = "does not load", s["error"]
        else:
            r.update(s)


def table(rows: list[dict]) -> None:
    print(f"\n{'file':<30} {'bytes':>12} {'blk bpw':>8} {'mean KLD':>9} {'top-1':>7} {'PPL':>8}")
    ok = sorted((r for r in rows if "kld" in r), key=lambda r: -r["bytes"])
    for r in ok:
        print(f"{r['name']:<30} {r['bytes']:>12,} {r['block_bpw']:>8.3f} {r['kld']:>9.5f} "
              f"{100 * r['top1']:>6.2f}% {r['ppl']:>8.3f}")  # fmt: skip
    for r in rows:
        if "kld" not in r:
            print(f"{r['name']:<30} {r['status']} ({r.get('version', '')}): "
                  f"{r.get('error', '').splitlines()[-1][:160]}")  # fmt: skip


def markdown(rows: list[dict]) -> str:
    """The table for docs: figures by size, then the rows without figures and why."""
    out = [
        "| file | bytes | block bpw | mean KLD | top-1 | PPL | note |",
        "|---|--:|--:|--:|--:|--:|---|",
    ]
    for r in sorted((r for r in rows if "kld" in r), key=lambda r: -r["bytes"]):
        note = []
        if r.get("budget"):
            note.append(f"budget {r['budget']:,} B ({100 * (r['bytes'] / r['budget'] - 1):+.2f} %)")
        if r["kind"] == "auto":
            note.append(f"quantkit {r['commit']}")
        if r["kind"] == "peer":
            note.append(f"{r['peer']} {r['version']}, avg_bits {r.get('avg_bits')}")
        out.append(f"| {r['name']} | {r['bytes']:,} | {r['block_bpw']:.3f} | {r['kld']:.5f} | "
                   f"{100 * r['top1']:.2f} % | {r['ppl']:.3f} | {'; '.join(note)} |")  # fmt: skip
    for r in rows:
        if "kld" not in r:
            err = r.get("error", "").strip().splitlines()[-1].replace("|", "\\|")
            out.append(f"| {r['name']} | — | — | — | — | — | {r['status']} "
                       f"({r.get('peer', '')} {r.get('version', '')}): `{err}` |")  # fmt: skip
    return "\n".join(out) + "\n"


def chart(rows: list[dict], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        print("no matplotlib: no chart")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from quantkit.validate.report import pareto_front

    style = {"stock": ("tab:blue", "o", 25, "llama.cpp stock (same imatrix)"),
             "auto": ("tab:red", "*", 140, "quantkit gguf:auto"),
             "peer": ("tab:purple", "D", 50, "peers")}  # fmt: skip
    fig, ax = plt.subplots(figsize=(9, 5.5))
    pts = [r for r in rows if "kld" in r and r["kld"] > 0]
    front = pareto_front([(r["bytes"] / 2**20, r["kld"]) for r in pts])
    ax.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.5,
            label="Pareto front")  # fmt: skip
    seen: set[str] = set()
    for r in pts:
        c, m, s, lab = style[r["kind"]]
        ax.scatter([r["bytes"] / 2**20], [r["kld"]], color=c, marker=m, s=s, zorder=3,
                   label=None if r["kind"] in seen else lab)  # fmt: skip
        seen.add(r["kind"])
        ax.annotate(r["name"], (r["bytes"] / 2**20, r["kld"]), textcoords="offset points",
                    xytext=(4, 4), fontsize=7)  # fmt: skip
    for r in rows:
        if r["kind"] == "auto":
            ax.axvline(r["budget"] / 2**20, color="grey", lw=0.6, ls=":")
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD to F16")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
