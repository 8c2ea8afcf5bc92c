"""The reference quality protocol on the embedded default, computed as llama-perplexity does.

    .venv/bin/python bench/quality.py [--chunks 20] [--calib-chunks 20] [--ctx 512]

Importance matrix from tinystories_train_head.txt (ctx 512, 20 chunks), perplexity of each file
on wiki.test.raw (ctx 512, first 20 chunks; llama-perplexity's chunking and scoring), KLD and
top-1 agreement against the F16 file. llama.cpp's own tools (llama-imatrix + llama-quantize +
llama-perplexity) gave on this model: F16 27.84, Q4_K_M 29.36 (28.57 with imatrix), IQ4_XS 33.92
(31.11 with imatrix).

With ``--llamacpp-tools DIR`` (the bin/ folder printed by bench/build_llamacpp_tools.sh: the same
llama.cpp source and CPU flags as the engine) the same protocol also runs llama.cpp's own
llama-imatrix + llama-quantize, so both importance matrices are compared on one machine and one
llama.cpp version (rows tagged "llama.cpp").
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import time
from pathlib import Path

from quantkit.text import read_text

FIXTURES = Path(__file__).resolve().parents[2] / "shared" / "fixtures"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--calib-chunks", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--types", default="Q4_K_M,IQ4_XS")
    ap.add_argument("--kld", action="store_true", help="also KLD / top-1 against F16 (slower)")
    ap.add_argument("--llamacpp-tools", type=Path, help="bin/ with llama-imatrix, llama-quantize")
    args = ap.parse_args()

    from quantkit.convert import QuantSettings, convert
    from quantkit.demo import demo_model
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix
    from quantkit.quantize.gguf.quantizer import QuantizeOptions
    from quantkit.validate.quality import llama_tokens, score_files

    model = demo_model()
    calib = read_text(FIXTURES / "tinystories" / "tinystories_train_head.txt")
    wiki = read_text(FIXTURES / "wikitext-2-raw" / "wiki.test.raw")
    print(
        f"calibrating {args.calib_chunks}×{args.ctx}, evaluating {args.chunks}×{args.ctx} (flash attention on, as llama-perplexity)",
        flush=True,
    )
    types = args.types.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        f16 = convert(model, ["gguf:F16"], t / "m-F16.gguf").artifacts[0].path
        t0 = time.perf_counter()
        im = collect_imatrix(
            model, calib, ctx=args.ctx, chunks=args.calib_chunks, threads=args.threads
        )
        t_im = time.perf_counter() - t0
        save_imatrix(im, t / "im.gguf")
        qs = QuantSettings(options=QuantizeOptions(threads=args.threads))
        plain = convert(f16, [f"gguf:{x}" for x in types], t / "plain", quant=qs).artifacts
        qs_im = QuantSettings(
            options=QuantizeOptions(threads=args.threads), imatrix_file=t / "im.gguf"
        )
        withim = convert(f16, [f"gguf:{x}" for x in types], t / "imatrix", quant=qs_im).artifacts
        theirs: list[Path] = []
        if args.llamacpp_tools:
            calib_file = FIXTURES / "tinystories" / "tinystories_train_head.txt"
            run = [
                str(args.llamacpp_tools / "llama-imatrix"),
                "-m",
                str(f16),
                "-f",
                str(calib_file),
            ]
            run += [
                "-c",
                str(args.ctx),
                "--chunks",
                str(args.calib_chunks),
                "-t",
                str(args.threads),
            ]
            subprocess.run([*run, "-o", str(t / "im-llama.gguf")], check=True, capture_output=True)
            (t / "llama.cpp").mkdir()
            for x in types:
                out = t / "llama.cpp" / f"m-{x}.gguf"
                q = [
                    str(args.llamacpp_tools / "llama-quantize"),
                    "--imatrix",
                    str(t / "im-llama.gguf"),
                ]
                q += [str(f16), str(out), x, str(args.threads)]
                subprocess.run(q, check=True, capture_output=True)
                theirs.append(out)

        # llama-perplexity tokenizes the whole file; the first chunks only need a prefix of it
        prefix = wiki[: max(200_000, args.chunks * args.ctx * 8)]
        tokens, bos = llama_tokens(f16, prefix, n_ctx=args.ctx)
        paths = [f16] + [a.path for a in plain] + [a.path for a in withim] + theirs
        t0 = time.perf_counter()
        res = score_files(
            paths,
            tokens,
            n_ctx=args.ctx,
            n_chunks=args.chunks,
            bos=bos,
            reference=f16 if args.kld else None,
            threads=args.threads,
        )
        t_eval = time.perf_counter() - t0
        sizes = {str(p): Path(p).stat().st_size for p in paths}  # before the temp dir goes

    print(
        f"imatrix: {im.chunks} chunks × {args.ctx} tokens in {t_im:.1f} s; evaluation {t_eval:.1f} s"
    )
    print(
        f"wiki.test.raw, ctx {args.ctx}, {args.chunks} chunks"
        + ("; KLD/top-1 against F16" if args.kld else "")
    )
    print(f"{'file':<12} {'imatrix':<9} {'size MB':>8} {'PPL':>18} {'mean KLD':>10} {'top-1':>7}")
    for p in paths:
        acc = res[str(p)]
        ppl, err = acc.ppl()
        kl = acc.kld_stats() if args.kld else {"mean": float("nan"), "top1": float("nan")}
        name = Path(p).stem.split("-")[-1] if "-" in Path(p).stem else Path(p).stem
        tag = "yes" if "/imatrix/" in str(p) else ("-" if p == f16 else "no")
        tag = "llama.cpp" if "/llama.cpp/" in str(p) else tag
        print(
            f"{name:<12} {tag:<9} {sizes[str(p)] / 1e6:8.1f} {ppl:10.4f} ± {err:6.4f} {kl['mean']:10.5f} {100 * kl['top1']:6.1f}%"
        )


if __name__ == "__main__":
    main()
