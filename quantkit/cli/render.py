"""How convert results are shown: tables for people, JSON for machines, notes on stderr."""

from __future__ import annotations

import json
from typing import Any

import click

from quantkit.table import format_table, human_bytes


def imatrix_json(im: Any) -> dict[str, Any]:
    return {
        "entries": len(im.entries),
        "chunks": im.chunks,
        "expert_coverage": im.expert_coverage(),  # tensor -> tokens per expert
        "unrouted_experts": im.unrouted(),  # tensor -> experts that saw no token
    }


def echo_expert_coverage(im: Any, *, table: bool = True) -> None:
    """MoE: tokens per expert, one row per layer (gate/up/down of a layer share the routing);
    experts never routed to get a note on stderr."""
    cov = im.expert_coverage()
    if not cov:
        return
    layers: dict[str, list[int]] = {}
    for name, counts in cov.items():
        layers.setdefault(name.split(".ffn_")[0], counts)
    rows = [
        [layer, " ".join(str(c) for c in counts),
         ", ".join(str(i) for i, c in enumerate(counts) if c == 0) or "-"]
        for layer, counts in layers.items()
    ]  # fmt: skip
    if table:
        click.echo("importance matrix, tokens per expert:")
        click.echo(format_table(["layer", "tokens per expert", "never routed"], rows))
    n = sum(c == 0 for counts in layers.values() for c in counts)
    if n:
        click.echo(
            f"note: {n} expert(s) saw no calibration token; llama.cpp quantizes them with uniform "
            "importance (as without an imatrix). More or more varied calibration text covers them.",
            err=True,
        )


def _echo_auto_plans(autos: list[Any]) -> None:
    """gguf:auto dry run: the budget, the predicted size (exact) and KLD, each tensor's type."""
    for a in autos:
        p = a.details["auto"]
        sens = p["sensitivity"]
        click.echo(
            f"{a.label}: predicted {p['predicted_bytes']:,} bytes ({human_bytes(p['predicted_bytes'])}), "
            f"{p['predicted_bpw']:.3f} bits per weight, predicted mean KLD {p['predicted_kld']:.4g} → {a.path}"
        )
        click.echo(
            "  types: " + ", ".join(f"{k} ×{v}" for k, v in p["histogram"].items())
            + f"; sensitivity {'from the cache' if sens['cache_hit'] else 'measured'}"
            + ("" if sens["gains"] else " (no --calib text: per-kind gains not measured, raw proxy)")
        )  # fmt: skip
        bar = sens.get("error_bar") or {}
        if sens.get("sample_values") and bar:
            click.echo(
                f"  sampled {sens['sample_values']:,} values per tensor: relative standard error "
                f"of the chosen types' errors median {100 * bar['median']:.1f} %, "
                f"95th percentile {100 * bar['p95']:.1f} %"
            )
        _echo_selection(p.get("selection"))
        click.echo("\nper tensor:")
        click.echo(
            format_table(
                ["tensor", "type", "predicted KLD"],
                [[n, t, f"{p['tensor_kld'][n]:.3g}"] for n, t in p["types"].items()],
            )
        )


def _echo_selection(sel: dict[str, Any] | None) -> None:
    """gguf:auto's candidates: measured on held-out calibration chunks, or why not."""
    if not sel:
        return
    if not sel.get("winner"):
        click.echo(f"  candidates (not measured: {sel.get('why', 'dry run')}):")
    else:
        margin = sel.get("margin")
        click.echo(
            f"  shipped {sel['winner']} of {len(sel['candidates'])} candidates, measured in "
            f"llama.cpp on {sel['tokens']:,} held-out calibration tokens ({sel['seconds']:.0f} s)"
            + ("" if margin is None else
               f"; {100 * margin:+.1f} % KLD against the best stock file measured "
               f"({sel['best_reference']})")
        )  # fmt: skip
    rows = [[c["name"], c["source"], f"{c['bytes']:,}",
             "" if c["predicted_kld"] is None else f"{c['predicted_kld']:.4g}",
             "" if c["measured_kld"] is None else f"{c['measured_kld']:.4g}"]
            for c in sel["candidates"]]  # fmt: skip
    click.echo(
        format_table(["candidate", "source", "bytes", "predicted KLD", "measured KLD"], rows)
    )


def show(res: Any, o: Any, *, as_json: bool, seconds: float) -> None:
    """A BuildResult (quantkit/pipeline/build.py): notes on stderr, then JSON or tables."""
    _notes(res, o, table=not as_json)
    if as_json:
        click.echo(json.dumps(_json(res, o, seconds), indent=2))
        return
    if o.dry_run:
        _dry_run(res.artifacts)
        return
    click.echo(
        format_table(
            ["target", "size", "bits/weight", "fallbacks", "time", "path"],
            [[a.label, human_bytes(a.size), _bpw(a), _fallbacks(a), f"{a.seconds:.1f}s",
              str(a.path)] for a in res.artifacts],
        )
    )  # fmt: skip
    for a in res.artifacts:
        sel = ((a.details or {}).get("auto") or {}).get("selection") or {}
        if sel.get("winner"):
            click.echo(f"{a.label}:")
            _echo_selection(sel)
        f = (a.audit or {}).get("fallbacks") or []
        if f:
            click.echo(
                f"{a.label}: {len(f)} tensor(s) fell back, e.g. {f[0]['tensor']} "
                f"{f[0]['wanted']}→{f[0]['got']} ({f[0]['ncols']} cols not a multiple of "
                f"{f[0]['block']}); `quantkit inspect {a.path}` lists all",
                err=True,
            )


def _bpw(a: Any) -> str:
    if a.audit:
        return f"{a.audit['bits_per_weight']:.2f}"
    if a.format == "vllm":  # layers quantized / left in float
        return f"{a.details['quantized_layers']} layers ({len(a.details['ignored_layers'])} float)"
    return ""


def _fallbacks(a: Any) -> str:
    return str(len(a.audit.get("fallbacks") or [])) if a.audit else ""


def _notes(res: Any, o: Any, table: bool) -> None:
    for w in res.warnings:
        click.echo(f"quantkit: warning: {w}", err=True)
    g = res.gguf
    if g is not None and g.clamped_f16:
        items = sorted(g.clamped_f16.items(), key=lambda kv: -kv[1])
        click.echo(
            f"quantkit: warning: --clamp-f16 clamped {len(items)} tensor(s) to ±65504: "
            + ", ".join(f"{n} (max |x| {v:.4g})" for n, v in items),
            err=True,
        )
    if g is not None and g.converter == "upstream":
        why = (
            "--converter upstream"
            if o.converter == "upstream"
            else "fallback: quantkit has no native class for this architecture"
        )
        click.echo(
            f"quantkit: converted with llama.cpp's own convert_hf_to_gguf.py ({why})", err=True
        )
    for note in res.notes:
        click.echo(f"note: {note}", err=True)
    if g is not None and g.imatrix is not None:
        echo_expert_coverage(g.imatrix, table=table)
    if g is not None and g.unused_tensors and not o.dry_run:
        click.echo(
            f"note: {len(g.unused_tensors)} checkpoint tensor(s) not needed by llama.cpp: "
            + ", ".join(g.unused_tensors[:5]),
            err=True,
        )


def _json(res: Any, o: Any, seconds: float) -> dict[str, Any]:
    out = {**res.to_json(), "dry_run": o.dry_run, "seconds": round(seconds, 3)}
    g, v = res.gguf, res.vllm
    if g is not None:
        out.update(converter=g.converter, unused_tensors=g.unused_tensors,
                   clamped_f16=g.clamped_f16)  # fmt: skip
        if g.imatrix is not None:
            out["imatrix"] = imatrix_json(g.imatrix)
    if v is not None:
        out.update(memory_estimate=v.plan.memory_estimate, peak_rss=v.worker.get("peak_rss"),
                   offload_cpu_bytes=v.plan.offload_cpu_bytes,
                   versions=v.worker.get("versions"))  # fmt: skip
    return out


def _dry_run(arts: list[Any]) -> None:
    """Each file's planned types and predicted size; a gguf:auto plan in full."""
    autos = [a for a in arts if "auto" in a.details and a.format == "gguf"]
    if autos:
        _echo_auto_plans(autos)
    for a in arts:
        if "auto" in a.details and a.format == "vllm":
            _echo_vllm_auto_plan(a.label, a.details["auto"])
    plain = [a for a in arts if "auto" not in a.details and "planned" in a.details]
    for a in plain:
        planned = a.details["planned"]
        click.echo(f"{a.label}: {len(planned)} tensors, predicted {human_bytes(a.size)} → {a.path}")
        hist: dict[str, int] = {}
        for t in planned.values():
            hist[t] = hist.get(t, 0) + 1
        click.echo(
            "  types: "
            + ", ".join(f"{k} ×{v}" for k, v in sorted(hist.items(), key=lambda kv: -kv[1]))
        )
        f = a.details.get("fallbacks") or []
        if f:
            click.echo(
                f"  fallbacks: {len(f)} (e.g. {f[0]['tensor']} {f[0]['wanted']}→{f[0]['got']})"
            )
    if plain:
        click.echo("\nper tensor:")
        names = list(plain[0].details["planned"])
        click.echo(
            format_table(
                ["tensor"] + [a.label for a in plain],
                [[n] + [a.details["planned"].get(n, "") for a in plain] for n in names],
            )
        )


def _echo_vllm_auto_plan(label: str, p: dict[str, Any]) -> None:
    """gptq:auto dry run: per fused group its scheme, bits and predicted KLD; the average."""
    for note in p["notes"]:
        click.echo(f"note: {label}: {note}", err=True)
    click.echo(
        f"{label}: predicted {p['predicted_bits']:.3f} bits per weight ({p['bits_asked']:g} "
        f"asked), predicted KLD {p['predicted_kld']:.4g}; candidates "
        f"{', '.join(p['candidates'])}; "
        + ", ".join(f"{k} ×{v}" for k, v in p["histogram"].items())
    )
    if "selection" in p:
        from quantkit.quantize.vllm.auto.plan import selection_line

        click.echo(f"{label}: {selection_line(p['selection'])}")
    click.echo(
        format_table(
            ["group", "scheme", "bits", "predicted KLD"],
            [[g["group"], g["scheme"], f"{g['bits']:.3f}", f"{g['predicted_kld']:.3g}"]
             for g in p["groups"]],
        )
    )  # fmt: skip
