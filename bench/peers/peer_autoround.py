"""AutoRound's AutoScheme (mixed GGUF types at an average bit width) exported as one GGUF file.

Runs inside the peer-autoround env (bench/peers/setup.sh), not quantkit's:

    peer-autoround/bin/python bench/peers/peer_autoround.py MODEL --avg-bits 4.9 \
        --calib calib.txt --out DIR [--options GGUF:Q3_K_S,...] [--format gguf:q4_k_m]

AutoScheme picks, per Linear layer, one of ``--options`` so that the average bits over the
layers it assigns meet ``--avg-bits``; AutoRound then quantizes (RTN with its imatrix-aware
search, ``iters=0``: the mode its docs recommend for GGUF) and writes the GGUF. Calibration: the
text file cut into ``--nsamples`` pieces of at least ``--seqlen`` tokens (AutoRound drops
shorter ones), so it sees the same tokens as quantkit's importance matrix. Prints one JSON line
(file, seconds, version, layer types) last.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path


def calib_pieces(path: Path, tokenizer, n: int, seqlen: int) -> list[str]:
    """``n`` consecutive pieces of the text, each exactly ``seqlen`` tokens long."""
    ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    pieces = [ids[i * seqlen : (i + 1) * seqlen] for i in range(n)]
    # decode/encode can merge tokens at a cut: a few tokens of slack keep every piece >= seqlen
    return [tokenizer.decode(p + ids[(i + 1) * seqlen : (i + 1) * seqlen + 8])
            for i, p in enumerate(pieces) if len(p) == seqlen]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("model", type=Path)
    ap.add_argument("--avg-bits", type=float, required=True)
    ap.add_argument("--calib", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument(
        "--options", default="GGUF:Q2_K_S,GGUF:Q3_K_S,GGUF:Q4_K_S,GGUF:Q5_K_S,GGUF:Q6_K"
    )
    ap.add_argument(
        "--format",
        default="gguf:q4_k_m",
        help="export format; AutoScheme's per-layer types override its main type",
    )
    ap.add_argument("--nsamples", type=int, default=20)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--iters", type=int, default=0)
    ap.add_argument(
        "--scheme-nsamples",
        type=int,
        default=16,
        help="samples AutoScheme scores the options on (its own default: 16)",
    )
    ap.add_argument(
        "--disable-opt-rtn",
        action="store_true",
        help="plain RTN instead of AutoRound's imatrix-optimized RTN (its default, much slower)",
    )
    ap.add_argument(
        "--calib-json",
        type=Path,
        help="where the calibration pieces go (default OUT/calib.json); AutoScheme caches its "
        "per-option scores under a key that holds this path, so runs at other avg_bits that "
        "name the same file reuse them",
    )
    args = ap.parse_args()

    import auto_round
    import torch
    from auto_round import AutoRound, AutoScheme
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    # AutoScheme takes its calibration text only as a dataset name or a local .json file
    args.out.mkdir(parents=True, exist_ok=True)
    data = args.calib_json or args.out / "calib.json"
    if not data.exists():
        data.parent.mkdir(parents=True, exist_ok=True)
        data.write_text(json.dumps(calib_pieces(args.calib, tok, args.nsamples, args.seqlen)))
    scheme = AutoScheme(
        avg_bits=args.avg_bits,
        options=args.options,
        # the GGUF super-block scales are part of each type's bits per weight in llama.cpp too
        ignore_scale_zp_bits=False,
        nsamples=args.scheme_nsamples,
        seqlen=args.seqlen,
        dataset=str(data),
        device_map="cpu",
    )
    t0 = time.perf_counter()
    ar = AutoRound(model=model, tokenizer=tok, scheme=scheme, dataset=str(data), iters=args.iters,
                   disable_opt_rtn=args.disable_opt_rtn, nsamples=args.nsamples, seqlen=args.seqlen, device_map="cpu")  # fmt: skip
    ar.quantize_and_save(str(args.out), format=args.format)
    seconds = time.perf_counter() - t0
    files = sorted(args.out.rglob("*.gguf"))
    layer_types = Counter(
        str(c.get("gguf_type") or c.get("data_type") or c.get("bits"))
        for c in (getattr(ar, "layer_config", None) or {}).values()
        if isinstance(c, dict)
    )
    print(json.dumps({"files": [str(f) for f in files], "seconds": seconds,
                      "version": auto_round.__version__, "layer_types": dict(layer_types)}))  # fmt: skip


if __name__ == "__main__":
    main()
