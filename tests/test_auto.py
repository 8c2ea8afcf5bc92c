"""gguf:auto: budget target parsing, the solver, exact sizes, the plan written by llama.cpp."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
from conftest import TRAIN_TEXT, make_tiny_model, run_cli

from quantkit.errors import InputError
from quantkit.quantize.gguf.auto.solver import BudgetTooSmall, Option, solve
from quantkit.quantize.gguf.auto.spec import AutoSpec, parse_auto


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama (rows of 256 and 512), its F16 GGUF and an importance matrix; a private
    sensitivity cache so that the first plan is always a miss."""
    from quantkit.convert import convert
    from quantkit.quantize.gguf.imatrix import collect_imatrix, save_imatrix

    root = tmp_path_factory.mktemp("auto")
    model = make_tiny_model(root / "tiny", "LlamaForCausalLM")
    calib = root / "calib.txt"
    calib.write_text(TRAIN_TEXT * 3)
    f16 = convert(model, ["gguf:F16"], root / "tiny-F16.gguf").artifacts[0].path
    im = collect_imatrix(model, calib.read_text(), ctx=64, threads=2)
    save_imatrix(im, root / "im.gguf")
    return {"root": root, "model": model, "calib": calib, "f16": f16, "im": root / "im.gguf"}


@pytest.fixture
def cached(work, monkeypatch) -> dict[str, Path]:
    monkeypatch.setenv("QUANTKIT_CACHE", str(work["root"] / "cache"))
    return work


def test_spec_parsing() -> None:
    assert parse_auto("gguf:auto:size=100MB") == AutoSpec(size=100_000_000)
    assert parse_auto("gguf:auto:size=2MiB").size == 2 * 2**20
    assert parse_auto("gguf:auto:size=12345").size == 12345
    s = parse_auto("gguf:auto:bpw=4.5:types=q4_k,Q8_0")
    assert s.bpw == 4.5 and s.types == ("Q4_K", "Q8_0")
    for bad in ("gguf:auto", "gguf:auto:size=1MB:bpw=4", "gguf:auto:bpw=x",
                "gguf:auto:size=1XB", "gguf:auto:types=Q4_K_M:bpw=4", "gguf:auto:foo=1"):  # fmt: skip
        with pytest.raises(InputError):
            parse_auto(bad)


def _brute(options: dict[str, list[Option]], budget: int) -> float:
    best = float("inf")
    for combo in itertools.product(*options.values()):
        if sum(o.cost for o in combo) <= budget:
            best = min(best, sum(o.kld for o in combo))
    return best


def test_solver_respects_budget_and_is_near_optimal() -> None:
    rng = random.Random(0)
    for _ in range(60):
        options = {}
        for t in range(5):
            opts, cost, kld = [], rng.randint(10, 30), rng.uniform(5, 10)
            for _k in range(4):
                opts.append(Option(f"T{_k}", cost, kld))
                cost += rng.randint(5, 40)
                kld *= rng.uniform(0.1, 0.9)
            options[f"t{t}"] = opts
        lo = sum(o[0].cost for o in options.values())
        hi = sum(o[-1].cost for o in options.values())
        budget = rng.randint(lo, hi)
        sol = solve(options, budget)
        assert sol.cost <= budget
        assert sol.cost == sum(o.cost for o in sol.choice.values())
        # greedy over convex hulls: optimal up to one unused step; never far off here
        assert sol.kld <= _brute(options, budget) * 1.6 + 1e-9
    with pytest.raises(BudgetTooSmall):
        solve({"a": [Option("x", 10, 1.0)]}, 9)


def test_plan_written_exactly(cached, tmp_path: Path) -> None:
    """Predicted size == written size, within the budget; the file's types are the plan's;
    a second plan reuses the cached sensitivity."""
    from quantkit.convert import QuantSettings, convert
    from quantkit.quantize.gguf.quantizer import QuantizeOptions
    from quantkit.quantize.gguf.reader import read_gguf

    work = cached
    f16_size = work["f16"].stat().st_size
    budget = f16_size * 4 // 10
    qs = QuantSettings(options=QuantizeOptions(threads=2), calib=None, imatrix_file=work["im"])
    dry = convert(work["f16"], [f"gguf:auto:size={budget}"], tmp_path, quant=qs, dry_run=True)
    plan = dry.artifacts[0]
    assert plan.auto is not None and plan.size <= budget
    assert not plan.auto["sensitivity"]["cache_hit"]
    res = convert(work["f16"], [f"gguf:auto:size={budget}"], tmp_path, quant=qs)
    art = res.artifacts[0]
    assert art.auto["sensitivity"]["cache_hit"]
    assert art.size == plan.size == art.path.stat().st_size <= budget
    written = {t.name: t.type for t in read_gguf(art.path).tensors}
    assert {n: written[n] for n in art.auto["types"]} == art.auto["types"]
    assert len(set(art.auto["types"].values())) > 1  # a real mix at 40 % of F16
    assert budget - art.size < 0.01 * budget


def test_bpw_lands_within_one_percent(cached, tmp_path: Path) -> None:
    from quantkit.convert import QuantSettings, convert

    work = cached
    qs = QuantSettings(calib=work["calib"], calib_ctx=64)
    for bpw in (3.3, 5.0):  # K-quants only: no IQ grids to build, and the second is a cache hit
        target = f"gguf:auto:bpw={bpw}:types=Q2_K,Q3_K,Q4_K,Q5_K,Q6_K,Q8_0"
        res = convert(work["model"], [target], tmp_path / str(bpw), quant=qs)
        art = res.artifacts[0]
        got = art.audit.bpw
        assert got <= bpw, (bpw, got)
        sel = art.auto["selection"]
        if next(c for c in sel["candidates"] if c["name"] == sel["winner"])["source"] == "solver":
            assert bpw * 0.99 <= got, (bpw, got)  # a plan fills its budget; a stock file may not
        assert art.auto["sensitivity"]["gains"]  # measured in llama.cpp (--calib)


def test_fit_gains_recovers_kind_times_layer() -> None:
    """Probe KLDs made from known kind × layer gains are fit back to those products, where one
    gain per kind alone misattributes a layer with a huge error."""
    from quantkit.quantize.gguf.auto.sensitivity import fit_gains, layer_groups
    from quantkit.quantize.gguf.auto.sizes import Slot

    rng = random.Random(1)
    a = {"attn_q": 2.0, "ffn_down": 0.5}
    b = {0: 1.0, 1: 3.0, 2: 0.2}
    slots = [
        Slot(f"blk.{i}.{k}.weight", (32, 32), "F16", 2048, True, True, {"Q4_0": 576})
        for i in b for k in a
    ]  # fmt: skip
    errors = {s.name: {"Q4_0": rng.uniform(0.5, 2.0)} for s in slots}
    errors["blk.2.ffn_down.weight"]["Q4_0"] = 300.0  # activations far larger in one layer
    true = {s.name: a[s.kind] * b[s.layer] for s in slots}
    groups = layer_groups(slots, 3)
    probes = {
        f"kind:{k}": ([s for s in slots if s.kind == k],
                      sum(true[s.name] * errors[s.name]["Q4_0"] for s in slots if s.kind == k))
        for k in a
    }  # fmt: skip
    probes.update({
        f"layer:{g}": (m, sum(true[s.name] * errors[s.name]["Q4_0"] for s in m))
        for g, m in groups.items()
    })  # fmt: skip
    ka, kb = fit_gains(probes, errors, {s.name: s.kind for s in slots},
                       {s.name: g for g, m in groups.items() for s in m})  # fmt: skip
    group_of = {s.name: g for g, m in groups.items() for s in m}
    for s in slots:
        assert ka[s.kind] * kb[group_of[s.name]] == pytest.approx(true[s.name], rel=1e-3)
    # one gain per kind: blk.0's ffn_down predicted far too low (the miss this fit removes)
    down = [s for s in slots if s.kind == "ffn_down"]
    per_kind = probes["kind:ffn_down"][1] / sum(errors[s.name]["Q4_0"] for s in down)
    assert per_kind < 0.25 * true["blk.0.ffn_down.weight"]  # 4.7× too low


def test_selection_ships_the_best_measured_candidate(cached, tmp_path: Path) -> None:
    """With calibration text, gguf:auto writes the solver's plans and the stock files that fit,
    scores each in llama.cpp, and ships the lowest measured KLD; a dry run lists the same
    candidates unmeasured."""
    from quantkit.convert import QuantSettings, convert
    from quantkit.quantize.gguf.reader import read_gguf

    work = cached
    budget = work["f16"].stat().st_size * 45 // 100
    target = f"gguf:auto:size={budget}"
    qs = QuantSettings(calib=work["calib"], calib_ctx=64, imatrix_file=work["im"])
    dry = convert(work["f16"], [target], tmp_path, quant=qs, dry_run=True).artifacts[0]
    assert dry.auto["selection"]["measured"] is False
    art = convert(work["f16"], [target], tmp_path, quant=qs).artifacts[0]
    sel = art.auto["selection"]
    measured = [c for c in sel["candidates"] if c["measured_kld"] is not None]
    assert {c["source"] for c in measured} == {"solver", "stock"}
    assert all(c["bytes"] <= budget for c in sel["candidates"])
    best = min(measured, key=lambda c: c["measured_kld"])
    assert sel["winner"] == best["name"]
    assert art.size == best["bytes"] == art.path.stat().st_size <= budget
    written = {t.name: t.type for t in read_gguf(art.path).tensors}
    assert {n: written[n] for n in art.auto["types"]} == art.auto["types"]
    assert {c["name"] for c in dry.auto["selection"]["candidates"]} == {
        c["name"] for c in sel["candidates"]
    }
    # the table a person reads: which candidate shipped, against which stock file
    r = run_cli("convert", str(work["f16"]), "--to", target, "--imatrix", str(work["im"]),
                "--calib", str(work["calib"]), "--ctx", "64", "-o", str(tmp_path / "cli"),
                env={"QUANTKIT_CACHE": str(work["root"] / "cache")})  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"shipped {sel['winner']} of {len(sel['candidates'])} candidates" in r.stdout


@pytest.mark.parametrize(
    "args, expect",
    [
        (["--to", "gguf:auto:size=1MB:bpw=4", "--imatrix", "IM"], "exactly one budget"),
        (["--to", "gguf:auto:types=Q4_K"], "exactly one budget"),
        (["--to", "gguf:auto:bpw=4:types=IQ2_XS,Q4_K"], "IQ2_XS needs an importance matrix"),
        (["--to", "gguf:auto:size=10KB", "--imatrix", "IM"], "below the smallest file"),
    ],
)
def test_bad_specs_exit_2(cached, tmp_path: Path, args: list[str], expect: str) -> None:
    work = cached
    args = [str(work["im"]) if a == "IM" else a for a in args]
    r = run_cli("convert", str(work["f16"]), *args, "-o", str(tmp_path))
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and expect in lines[0] and " — " in lines[0], r.stderr
    assert not list(tmp_path.iterdir())


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np

    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    return float(np.corrcoef(ra, rb)[0, 1])


def test_row_sample_error_bar_covers_the_total() -> None:
    """The stratified estimate of a sum over rows is unbiased and its stated standard error
    covers the true total about as often as it says: rows with a trend and heavy outliers (what
    real weight rows look like), 400 draws of 32 rows out of 4096."""
    import numpy as np

    from quantkit.quantize.gguf.auto.sensitivity import estimate, sample_rows

    rng = np.random.default_rng(1)
    nrows = 4096
    row_err = (1 + np.linspace(0, 3, nrows)) * rng.lognormal(0, 1, nrows)
    truth = row_err.sum()
    est, hits = [], 0
    for k in range(400):
        idx = sample_rows(f"t{k}", nrows, 32)
        assert len(set(idx.tolist())) == 32 and idx.min() >= 0 and idx.max() < nrows
        total, rel = estimate(row_err[idx], nrows)
        assert rel > 0
        est.append(total)
        hits += abs(total - truth) <= 2 * rel * total
    assert abs(np.mean(est) / truth - 1) < 0.03  # unbiased
    # 2 SE: ~95 % nominal for a normal estimate; heavy-tailed rows (lognormal σ = 1) seen at 88 %
    assert hits / 400 >= 0.85
    assert estimate(row_err, nrows) == (pytest.approx(truth), 0.0)  # every row: exact


def test_sampled_pass_ranks_like_the_full_one(cached) -> None:
    """On the tiny model: the row-sampled pass (32 of 128-512 rows per tensor) against the full
    one, every tensor × type pair — Spearman ≥ 0.95, the full value within 2 stated standard
    errors for most pairs and within 15 % for all; a sample as large as the tensor is the full
    measurement exactly."""
    from quantkit.quantize.gguf.auto import sizes
    from quantkit.quantize.gguf.auto.sensitivity import MIN_ROWS, proxy_errors
    from quantkit.quantize.gguf.imatrix import load_imatrix

    work = cached
    im = load_imatrix(work["im"])
    imp = im.to_quantizer()
    types = ("Q8_0", "Q6_K", "Q5_0", "Q4_K", "Q4_0", "Q3_K", "Q2_K")
    slots = sizes.slots(work["f16"], set(imp), types)
    full, full_se, _ = proxy_errors(work["f16"], slots, imp, threads=2, sample=None)
    part, se, _ = proxy_errors(work["f16"], slots, imp, threads=2, sample=MIN_ROWS * 256)
    pairs = [(n, t) for n in full for t in full[n]]
    assert len(pairs) > 50 and all(v == 0 for d in full_se.values() for v in d.values())
    assert spearman([full[n][t] for n, t in pairs], [part[n][t] for n, t in pairs]) >= 0.95
    sampled = [(n, t) for n, t in pairs if se[n][t] > 0]
    assert len(sampled) > len(pairs) // 2  # most tensors have more rows than the sample
    off = [abs(part[n][t] / full[n][t] - 1) for n, t in sampled]
    within = [abs(part[n][t] - full[n][t]) <= 2 * se[n][t] * part[n][t] for n, t in sampled]
    assert max(off) < 0.15 and sum(within) >= 0.75 * len(within), (max(off), sum(within))
    again, _, _ = proxy_errors(work["f16"], slots, imp, threads=1, sample=10**9)
    assert again == full


def test_offgrid_model_leaves_every_grid_within_half_a_step() -> None:
    """bench/offgrid.py: weights on a Q4_1 (or Q8_0) grid are found, moved off it, and each stays
    within half a step of its level; a tensor on no grid is left alone."""
    import importlib.util

    import numpy as np

    path = Path(__file__).resolve().parents[1] / "bench" / "offgrid.py"
    spec = importlib.util.spec_from_file_location("offgrid", path)
    assert spec and spec.loader
    og = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(og)
    rng = np.random.default_rng(0)
    lo = rng.normal(0, 0.05, (64, 4, 1)).astype(np.float32)
    d = rng.uniform(0.002, 0.01, (64, 4, 1)).astype(np.float32)
    q = rng.integers(0, 16, (64, 4, 32))
    q[..., 0], q[..., 1] = 0, 15  # the block's min and max sit on levels 0 and 15
    w = (lo + d * q).reshape(64, 128).astype(np.float16).astype(np.float32)
    assert og.grid(w)[0] == "q4_1"
    out, kind = og.respread(w, rng, "uniform")
    assert kind == "q4_1" and og.grid(out) is None  # on no grid any more
    step = np.repeat(d, 32, axis=-1).reshape(64, 128)
    assert np.all(np.abs(out - w) <= 0.52 * step)  # half a step, plus F16 rounding of w
    noise = rng.normal(0, 1, (16, 64)).astype(np.float32)
    assert og.respread(noise, rng, "uniform")[1] == "copied"
