"""The validation report: JSON (schema in ``report.schema.json``, documented in
docs/report-schema.md), a terminal / Markdown table and a PNG chart of quality against size."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("report.schema.json")


def schema() -> dict[str, Any]:
    return json.loads(SCHEMA_PATH.read_text())


def check_schema(report: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` when ``report`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(report, schema())


def _f(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def _k(x: float | None) -> str:
    """KLD: fixed point, scientific below 1e-4 (an F32 file's KLD is ~1e-8)."""
    if x is None:
        return ""
    return f"{x:.1e}" if 0 < x < 1e-4 else f"{x:.6f}"


def _size(n: int | None) -> str:
    from quantkit.table import human_bytes

    return "" if n is None else human_bytes(n)


HEADERS = [
    "artifact",
    "type",
    "size",
    "bpw",
    "PPL",
    "ΔPPL %",
    "KLD mean",
    "KLD p99",
    "top-1 %",
    "|Δp|",
    "pp t/s",
    "tg t/s",
    "chat",
    "status",
]


# The status cell of an artifact that was not scored. "unsupported": the engine cannot run this
# format on this host (not a quality failure; the report still passes), "too-slow": it ran at a
# rate that does not fit the time budget (its quality is unknown: the report fails), "failed": it
# crashed.
_NOT_SCORED = {
    "unsupported": "not scorable on this host (see note)",
    "too-slow": "TOO SLOW for the time budget (see note)",
    "failed": "FAILED: ",
}


def unsupported_note(a: dict[str, Any]) -> str:
    """One line: the measured reason (validate/capabilities.py) and where it was measured."""
    return f"note: {a['name']} was built but is not scorable on this host: {a['error'] or ''}"


def rows(report: dict[str, Any]) -> list[list[str]]:
    ref = report["reference"]
    out = [
        [
            "reference",
            (ref["engine"].get("dtype") or "").upper(),
            "",
            "",
            f"{ref['ppl']:.4f} ± {ref['ppl_stderr']:.4f}",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "",
            "cached" if ref["cache"]["hit"] else "scored",
        ]
    ]
    for a in report["artifacts"]:
        if a["status"] != "ok":
            cell = _NOT_SCORED.get(a["status"], "FAILED: ")
            cell += (a["error"] or "")[:60] if cell.endswith(": ") else ""
            out.append([a["name"]] + [""] * (len(HEADERS) - 3) + [_chat_cell(a), cell])
            continue
        q, sz, sp = a["quality"], a["size"], a["speed"]
        failed = [g["gate"] for g in a["gates"] if not g["passed"]]
        status = ("gate failed: " + ", ".join(failed)) if failed else "ok"
        if sp.get("error"):
            status += " (speed run failed)"
        kld_note = "" if q.get("kld_method") == "exact" else "~"
        out.append(
            [
                a["name"],
                sz.get("file_type") or a["format"],
                _size(sz["file_bytes"]),
                _f(sz.get("bits_per_weight"), ".2f"),
                f"{q['ppl']:.4f} ± {q['ppl_stderr']:.4f}",
                _f(q["ppl_increase_pct"], "+.3f"),
                kld_note + _k(q.get("kld_mean")),
                kld_note + _k(q.get("kld_p99")),
                _f(q.get("top1_pct"), ".2f"),
                _f(q.get("mean_abs_dp"), ".5f"),
                _f(sp.get("pp_tps"), ".1f"),
                _f(sp.get("tg_tps"), ".1f"),
                _chat_cell(a),
                status,
            ]
        )
    return out


def _chat_cell(a: dict[str, Any]) -> str:
    from quantkit.validate.chat import summary

    return summary(a.get("chat"))


def notes(report: dict[str, Any]) -> list[str]:
    """The report's notes (settings capped to the model's context), then each artifact's (engine
    settings chosen by measurement, a speed run that failed after the scores were taken)."""
    out = list(report.get("notes") or [])
    for a in report["artifacts"]:
        out += [f"{a['name']}: {n}" for n in a.get("notes") or []]
        kernels = (a.get("engine") or {}).get("kernels")
        if kernels:  # what the engine logged it picked (vLLM: one line per linear method)
            out.append(f"{a['name']}: linear kernels: {', '.join(kernels)}")
        err = (a.get("speed") or {}).get("error")
        if err:
            out.append(f"{a['name']}: the speed run failed, quality figures kept: {err}")
        if a.get("chat"):
            from quantkit.validate.chat import findings

            out += findings(a["name"], a["chat"])
    return out


def approx_note(report: dict[str, Any]) -> str | None:
    """The footnote for "~" KLD figures (engines that return only top-k log-probs: vLLM)."""
    ks = sorted(
        {
            a["engine"].get("topk")
            for a in report["artifacts"]
            if a["status"] == "ok" and a["quality"].get("kld_method") == "approx-top-k"
        },
        key=str,
    )
    if not ks:
        return None
    k = "/".join(str(x) for x in ks)
    return (
        f"~ approximate KLD: the engine returns only its top-{k} log-probs per position; KLD is "
        "taken over those plus one bucket for the remaining mass (a lower bound of the exact KLD)"
    )


def terminal_table(report: dict[str, Any]) -> str:
    from quantkit.table import format_table

    d = report["data"]
    head = (
        f"{d['chunks']} chunks of {d['ctx']} tokens ({d['scored_tokens']} scored) from "
        f"{Path(d['path']).name}; {report['host']['threads']} threads on {report['host']['cpu']}"
    )
    lines = [head, "", format_table(HEADERS, rows(report))]
    note = approx_note(report)
    if note:
        lines.append(note)
    lines += [f"note: {n}" for n in notes(report)]
    for a in report["artifacts"]:
        t = a.get("tokenization")
        if t and t["differ_share"] > 0:
            lines.append(
                f"note: {a['name']}: llama.cpp's own tokenization differs from the reference on "
                f"{100 * t['differ_share']:.2f}% of tokens (scored on the reference ids)"
            )
        if a["status"] == "unsupported":
            lines.append(unsupported_note(a))
        elif a["status"] == "too-slow":
            lines.append(f"note: {a['name']}: {a['error']}")
        elif a["status"] != "ok" and a.get("log_tail"):
            lines.append(f"{a['name']} failed: {a['error']}; last log lines:")
            lines += ["  " + ln for ln in a["log_tail"][-8:]]
    for g in report["failed_gates"]:
        lines.append(
            f"GATE FAILED: {g['artifact']}: --{g['gate']} {g['threshold']:g} "
            f"(measured {_f(g['value'], '.6g') or 'n/a'})"
        )
    return "\n".join(lines)


def markdown(report: dict[str, Any]) -> str:
    d, h, ref = report["data"], report["host"], report["reference"]
    out = [
        "# quantkit validation report",
        "",
        f"- reference: `{ref['model']}` ({ref['engine']['version']}, "
        f"{ref['engine'].get('dtype', '')}), PPL {ref['ppl']:.4f} ± {ref['ppl_stderr']:.4f}",
        f"- text: `{d['path']}` — {d['tokens']} tokens, {d['chunks']} chunks of {d['ctx']}, "
        f"{d['scored_tokens']} scored",
        f"- host: {h['cpu']}, {h['threads']} threads" + (f", GPU {h['gpu']}" if h["gpu"] else ""),
        f"- result: **{'PASSED' if report['passed'] else 'FAILED'}**",
        "",
        "| " + " | ".join(HEADERS) + " |",
        "|" + "---|" * len(HEADERS),
    ]
    for r in rows(report):
        out.append("| " + " | ".join(c.replace("|", "\\|") for c in r) + " |")
    note = approx_note(report)
    if note:
        out += ["", note]
    if notes(report):
        out += [""] + [f"- {n}" for n in notes(report)]
    if report["failed_gates"]:
        out += ["", "## Failed gates", ""]
        for g in report["failed_gates"]:
            out.append(
                f"- `{g['artifact']}`: {g['gate']} {g['threshold']:g}, measured "
                f"{_f(g['value'], '.6g') or 'n/a'}"
            )
    for a in report["artifacts"]:
        if a["status"] == "unsupported":
            out += ["", f"## {a['name']}: not scorable on this host", "", a["error"] or ""]
        elif a["status"] == "too-slow":
            out += ["", f"## {a['name']}: too slow for the time budget", "", a["error"] or ""]
        elif a["status"] != "ok":
            out += ["", f"## {a['name']} failed", "", a["error"] or "", "", "```"]
            out += a.get("log_tail") or []
            out.append("```")
    return "\n".join(out) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """PNG: mean KLD and ΔPPL % against file size, one point per scored artifact."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [a for a in report["artifacts"] if a["status"] == "ok"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, label in (
        (axes[0], "kld_mean", "mean KLD to reference"),
        (axes[1], "ppl_increase_pct", "PPL increase %"),
    ):
        xs = [a["size"]["file_bytes"] / 2**20 for a in ok]
        ys = [a["quality"].get(key) for a in ok]
        pts = [(x, y, a) for x, y, a in zip(xs, ys, ok, strict=True) if y is not None]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], color="tab:blue")
        for x, y, a in pts:
            ax.annotate(
                a["size"].get("file_type") or a["name"],
                (x, y),
                textcoords="offset points",
                xytext=(4, 4),
                fontsize=8,
            )
        front = pareto_front([(p[0], p[1]) for p in pts])
        if len(front) > 1:  # what each megabyte buys: nothing smaller is better
            ax.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.6,
                    label="Pareto front")  # fmt: skip
            ax.legend(loc="upper right", fontsize=8)
        if key == "kld_mean" and pts and all(p[1] > 0 for p in pts):
            ax.set_yscale("log")
        ax.set_xlabel("file size (MiB)")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    fig.suptitle(
        f"{Path(report['reference']['model']).name}: quality vs size "
        f"({report['data']['chunks']}×{report['data']['ctx']} tokens)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """(size, loss) points no other point beats on both, by size ascending."""
    out: list[tuple[float, float]] = []
    for x, y in sorted(points):
        if not out or y < out[-1][1]:
            out.append((x, y))
    return out


def size_kld_chart(points: list[tuple[str, int, float, bool]], path: Path, title: str) -> None:
    """PNG: mean KLD (log) against file size, one labelled point per file, the Pareto front,
    highlighted points (``True``: e.g. gguf:auto files) in another colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 5.5))
    pts = [(b / 2**20, k, label, hi) for label, b, k, hi in points if k > 0]
    front = pareto_front([(x, y) for x, y, _, _ in pts])
    ax.step(*zip(*front, strict=True), where="post", color="tab:green", alpha=0.6,
            label="Pareto front")  # fmt: skip
    for x, y, label, hi in pts:
        ax.scatter([x], [y], color="tab:red" if hi else "tab:blue", marker="*" if hi else "o",
                   s=90 if hi else 25, zorder=3)  # fmt: skip
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_yscale("log")
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel("mean KLD to F16")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
