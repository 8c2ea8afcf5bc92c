"""gptq:auto: target grammar and refusals, fused groups, the budget, and one mixed checkpoint of a
tiny model written by llm-compressor and scored in vLLM (skipped where those envs are absent)."""

from __future__ import annotations

import json
import math
import re

import pytest
from conftest import (
    TRAIN_TEXT,
    assert_scored_as_measured,
    llmc_python_or_skip,
    make_tiny_model,
    run_cli,
    validate_report,
    vllm_env_or_skip,
)

from quantkit.errors import InputError
from quantkit.quantize.vllm.auto import host, select
from quantkit.quantize.vllm.auto.groups import fused_groups
from quantkit.quantize.vllm.auto.plan import AutoPlan, choose, config_groups, targets
from quantkit.quantize.vllm.auto.schemes import scheme
from quantkit.quantize.vllm.auto.sensitivity import Sensitivity
from quantkit.quantize.vllm.auto.spec import is_vllm_auto, parse_vllm_auto
from quantkit.targets import parse_target
from quantkit.validate.capabilities import Verdict


def test_spec_parses_and_refuses_with_exit_2():
    s = parse_target("gptq:auto:bits=4.5:types=W4G64,fp8,float,w4g64")
    assert s.bits == 4.5 and s.types == ("w4g64", "fp8", "float") and not s.force
    assert s.label() == "gptq-auto-4.5b"
    assert parse_target("gptq:auto:bits=5").family == "vllm"
    assert is_vllm_auto("gptq:auto:bits=5")
    assert not is_vllm_auto("gptq:bits=4,group=64")
    assert parse_vllm_auto("gptq:auto:bits=5:types=w8g128:force").force
    assert parse_vllm_auto("gptq:auto:bits=5").types is None
    for bad in ("gptq:auto", "gptq:auto:bits=x", "gptq:auto:bits=0", "gptq:auto:bits=4:size=9",
                "gptq:auto:bits=4:types=q4_k", "gptq:auto:bits=4:types=", "gptq:auto:bits=4:bits=5",
                "gptq:auto:bits=4:types=w4g96"):  # fmt: skip
        with pytest.raises(InputError) as e:
            parse_vllm_auto(bad)
        assert e.value.hint and "gptq:auto:bits=" in e.value.hint
    r = run_cli("convert", "nowhere", "--to", "gptq:auto:bits=4:types=w4g96")
    assert r.returncode == 2 and "w4g96" in r.stderr, r.stderr


def _verdicts(monkeypatch, runs: dict[str, bool]) -> None:
    from quantkit.validate import capabilities

    table = {
        row: Verdict(row, ok, None if ok else "ValueError: no kernel", {}, None, None, "now")
        for row, ok in runs.items()
    }
    monkeypatch.setattr(capabilities, "load", lambda engine, key=None: dict(table))
    monkeypatch.setattr(capabilities, "measure_rows", lambda rows, say=None: ({}, {}))


def test_candidates_follow_the_host_matrix(monkeypatch):
    _verdicts(monkeypatch, {"w4a16-g64:f16": True, "w8a16-g128:f16": False,
                            "fp8-dynamic:f16": True})  # fmt: skip
    c = host.runnable(parse_vllm_auto("gptq:auto:bits=5:types=w4g64,w8g128,fp8,float:force"),
                      "float16")  # fmt: skip
    assert [s.name for s in c.schemes] == ["w4g64", "w8g128", "fp8", "float"]
    with pytest.raises(InputError) as e:  # explicit and not runnable here: refused
        host.runnable(parse_vllm_auto("gptq:auto:bits=5:types=w4g64,w8g128"), "float16")
    assert "w8g128" in str(e.value) and "no kernel" in str(e.value) and ":force" in e.value.hint
    d = host.runnable(parse_vllm_auto("gptq:auto:bits=5"), "float16")  # defaults: dropped
    names = [s.name for s in d.schemes]
    assert "w8g128" not in names and {"w4g64", "fp8", "float"} <= set(names)
    assert "w8g128" in d.dropped and any("w4g32" in n for n in d.notes)  # unmeasured: kept, noted


LLAMA = [
    (f"model.layers.{i}.{p}", 256, out)
    for i in range(3)
    for p, out in (
        ("self_attn.q_proj", 256),
        ("self_attn.k_proj", 128),
        ("self_attn.v_proj", 128),
        ("self_attn.o_proj", 256),
        ("mlp.gate_proj", 512),
        ("mlp.up_proj", 512),
    )  # fmt: skip
] + [(f"model.layers.{i}.mlp.down_proj", 512, 256) for i in range(3)]


def test_fused_groups_share_one_scheme_and_targets_match_exactly():
    groups = fused_groups(LLAMA)
    assert len(groups) == 3 * 4
    qkv = next(g for g in groups if g.name == "model.layers.1.self_attn.qkv_proj")
    assert [m.name.rsplit(".", 1)[1] for m in qkv.members] == ["q_proj", "k_proj", "v_proj"]
    gu = next(g for g in groups if g.name == "model.layers.2.mlp.gate_up_proj")
    assert len(gu.members) == 2
    members = {"w4g64": [m.name for m in qkv.members + gu.members],
               "fp8": ["model.layers.0.mlp.down_proj"], "float": ["model.layers.0.self_attn.o_proj"]}  # fmt: skip
    cg, floats = config_groups(members)
    assert floats == ["model.layers.0.self_attn.o_proj"]
    assert cg["group_0"]["weights"]["type"] == "int"  # int first (capabilities reads its row)
    assert cg["group_1"]["input_activations"]["dynamic"] is True
    names = [n for n, _, _ in LLAMA]
    for g in cg.values():
        hit = {n for n in names for t in g["targets"] if re.match(t[3:], n)}
        want = set(members["w4g64"] if g["weights"]["type"] == "int" else members["fp8"])
        assert hit == want
    assert targets(["lm_head"]) == ["lm_head"]


def test_plan_within_budget_and_close_to_it():
    groups = fused_groups(LLAMA)
    schemes = [scheme(n) for n in ("w4g128", "w4g64", "w4g32", "fp8", "float")]
    options = {g.name: [s for s in schemes if g.fits(s)] for g in groups}
    base = {"w4g128": 8.0, "w4g64": 6.0, "w4g32": 5.0, "fp8": 1.0, "float": 0.0}
    errors = {g.name: {s: v * (1 + i) for s, v in base.items()} for i, g in enumerate(groups)}
    sens = Sensitivity(errors, gains={})
    weights = sum(g.weights for g in groups)
    for bits in (4.2, 4.5, 5.0, 6.0, 9.0):
        spec = parse_vllm_auto(f"gptq:auto:bits={bits}")
        choices, cost, w, budget = choose(spec, groups, options, sens, 16)
        assert w == weights and cost <= budget == math.floor(bits * weights)
        assert {c.group for c in choices} == {g.name for g in groups}  # one scheme per group
        # close: no group could take any better scheme within what is left of the budget
        by = {g.name: g for g in groups}
        for c in choices:
            g = by[c.group]
            mine = g.cost_bits(scheme(c.scheme), 16)
            for s in options[c.group]:
                if sens.kld(g, s.name) < c.predicted_kld:
                    assert cost - mine + g.cost_bits(s, 16) > budget, (bits, c, s.name)
    spread = {c.scheme for c in choose(parse_vllm_auto("gptq:auto:bits=6"), groups, options,
                                       sens, 16)[0]}  # fmt: skip
    assert len(spread) > 1
    with pytest.raises(InputError) as e:
        choose(parse_vllm_auto("gptq:auto:bits=3"), groups, options, sens, 16)
    assert "bits=4.13" in e.value.hint


def test_mixed_checkpoint_loads_and_scores_in_vllm(tmp_path):
    """A tiny fp16 Llama: dry run, then the export through the CLI (llm-compressor), then
    `quantkit validate` in vLLM: config groups of two schemes, bits at or below the budget."""
    llmc_python_or_skip()
    vllm_env_or_skip()
    model = make_tiny_model(tmp_path / "tiny", "LlamaForCausalLM", dtype="float16")
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    evalt = tmp_path / "eval.txt"  # disjoint from the calibration text
    evalt.write_text("The river ran past the old mill, and the boats came home at dusk. " * 40)
    # :force writes both schemes whatever this host's vLLM runs (an AVX2-only host runs no int4);
    # whether it may be scored here is then the measured matrix's call, for every scheme in it
    target = "gptq:auto:bits=6:types=w4g64,fp8,float:force"
    common = ("--calib", str(calib), "--samples", "4", "--seq-len", "64", "--json")
    r = run_cli("convert", str(model), "--to", target, "--dry-run", *common)
    assert r.returncode == 0, r.stderr
    (dry,) = json.loads(r.stdout)["artifacts"]
    assert dry["label"] == "gptq-auto-6b"
    plan = dry["auto"]
    assert plan["predicted_bits"] <= 6 and len(plan["histogram"]) >= 2
    out = tmp_path / "mixed"
    r = run_cli("convert", str(model), "--to", target, "-o", str(out), *common)
    assert r.returncode == 0, r.stderr
    art = json.loads(r.stdout)["artifacts"][0]
    assert art["auto"]["actual_bits"] <= 6 and art["auto"]["actual_bits"] > 5
    assert abs(art["auto"]["actual_bits"] - plan["predicted_bits"]) < 1e-3
    q = json.loads((out / "config.json").read_text())["quantization_config"]
    kinds = {(g["weights"]["type"], g["weights"]["num_bits"]) for g in q["config_groups"].values()}
    assert ("int", 4) in kinds and len(kinds) + (len(q["ignore"]) > 1) >= 2, q
    assert q["format"] in ("mixed-precision", "pack-quantized")
    r, rep = validate_report([out], model, evalt, tmp_path / "rep.json")
    assert r.returncode == 0, r.stderr
    (entry,) = rep["artifacts"]
    assert_scored_as_measured(entry, out)
    if entry["status"] == "ok":
        kld = entry["quality"]["kld_mean"]
        assert math.isfinite(kld) and 0 <= kld < 0.2, entry["quality"]


def test_sampled_errors_rank_like_the_full_ones():
    """The row-sampled proxy (32 output rows per Linear) against every row, on a tiny random
    Llama in torch: Spearman ≥ 0.95 over group × scheme pairs, the full value within 15 %; a
    sample as large as the Linear is the full measurement exactly."""
    import numpy as np
    import torch
    import transformers
    from conftest import TINY

    from quantkit.quantize.vllm.auto.sensitivity import proxy_errors

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(**{**TINY, "num_hidden_layers": 3})
    model = transformers.LlamaForCausalLM(cfg).eval()
    linears = [(n, m.in_features, m.out_features) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # fmt: skip
    groups = fused_groups(linears)
    schemes = [scheme(n) for n in ("w4g128", "w4g64", "w4g32", "w8g64", "fp8")]
    options = {g.name: [s for s in schemes if g.fits(s)] for g in groups}
    imp = {n: torch.rand(i) + 0.1 for n, i, _ in linears}
    full, full_se = proxy_errors(model, groups, options, imp, torch.bfloat16, sample=None)
    part, se = proxy_errors(model, groups, options, imp, torch.bfloat16, sample=32 * 256)
    pairs = [(g, s) for g in full for s in full[g]]
    assert all(v == 0 for d in full_se.values() for v in d.values())
    a, b = [full[g][s] for g, s in pairs], [part[g][s] for g, s in pairs]
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))
    assert float(np.corrcoef(ra, rb)[0, 1]) >= 0.95
    assert any(v > 0 for d in se.values() for v in d.values())
    assert max(abs(y / x - 1) for x, y in zip(a, b, strict=True)) < 0.15
    again, _ = proxy_errors(model, groups, options, imp, torch.bfloat16, sample=10**9)
    assert again == full


def _plan(bits: float, names: tuple[str, ...]) -> tuple[AutoPlan, list]:
    groups = fused_groups(LLAMA)
    schemes = [scheme(n) for n in names]
    options = {g.name: [s for s in schemes if g.fits(s)] for g in groups}
    base = {"w4g128": 8.0, "w4g64": 6.0, "w4g32": 5.0, "fp8": 1.0, "int8": 1.5, "float": 0.0}
    errors = {g.name: {s: v * (1 + i) for s, v in base.items()} for i, g in enumerate(groups)}
    sens = Sensitivity(errors, gains={"down_proj": 10.0, "qkv_proj": 0.5})
    spec = parse_vllm_auto(f"gptq:auto:bits={bits}")
    choices, cost, weights, budget = choose(spec, groups, options, sens, 16)
    return AutoPlan(spec, choices, cost, weights, budget, "float16", list(names),
                    sensitivity=sens), groups  # fmt: skip


def test_candidates_are_bounded_distinct_and_include_the_uniform_schemes_that_fit():
    names = ("w4g128", "w4g64", "w4g32", "fp8", "float")
    for bits, uniform in ((4.5, {"w4g32", "w4g64", "w4g128"}), (4.2, {"w4g128"})):
        plan, groups = _plan(bits, names)
        cands = select.candidates(plan, groups)
        assert len(cands) <= select.MAX_SOLVER + select.MAX_UNIFORM
        assert {c.name for c in cands if c.source == "uniform"} == {f"uniform-{u}" for u in uniform}
        assert cands[0].name == "solver" and cands[0].plan.choices == plan.choices
        picks = [tuple(x.scheme for x in c.plan.choices) for c in cands]
        assert len(set(picks)) == len(picks)  # the same plan is measured once
        for c in cands:
            # every prediction under the per-kind gains, comparable across candidates
            assert c.plan.predicted_kld == pytest.approx(
                sum(plan.sensitivity.kld(g, x.scheme)
                    for g, x in zip(groups, c.plan.choices, strict=True)))  # fmt: skip
            if c.source == "solver":
                assert c.plan.cost_bits <= plan.budget_bits
            else:  # weight_shape metadata aside, at the budget
                shapes = sum(len(g.members) for g in groups) * 128
                assert c.plan.cost_bits - shapes <= plan.budget_bits
    # the raw-error plan differs from the per-kind one where the gains move the ranking
    plan, groups = _plan(4.5, names)
    assert "solver-raw" in {c.name for c in select.candidates(plan, groups)}
    # a solver plan that is a uniform scheme is measured once, as the uniform reference
    plan, groups = _plan(4.5, ("w4g64",))
    assert [(c.name, c.source) for c in select.candidates(plan, groups)] == [
        ("uniform-w4g64", "uniform")
    ]


def test_selection_picks_the_lowest_measured_kld_and_reports_the_margin():
    plan, groups = _plan(4.5, ("w4g128", "w4g64", "w4g32", "fp8", "float"))
    cands = select.candidates(plan, groups)
    kld = {c.name: 0.1 + 0.01 * i for i, c in enumerate(cands)}
    kld["uniform-w4g64"] = 0.05  # a uniform scheme measured best: it ships
    for c in cands:
        c.measured_kld = kld[c.name]
    sel = select.Selection(cands, chunks=8, tokens=2040, seconds=1.0)
    j = sel.to_json()
    assert j["winner"] == j["best_reference"] == "uniform-w4g64" and j["margin"] == 0
    cands[0].measured_kld = 0.04
    j = sel.to_json()
    assert j["winner"] == "solver" and j["best_reference"] == "uniform-w4g64"
    assert j["margin"] == pytest.approx((0.04 - 0.05) / 0.05)
    assert {"name", "source", "bits", "predicted_kld", "measured_kld"} <= set(j["candidates"][0])


def test_selection_ships_the_measured_best_candidate(tmp_path):
    """A tiny fp16 Llama, gptq:auto through the CLI: every candidate exported and scored in
    vLLM on held-out calibration chunks, the uniform ones among them; the checkpoint written is
    the one measured best. Uses schemes vLLM's CPU build runs on AVX2 and AVX-512 alike."""
    llmc_python_or_skip()
    vllm_env_or_skip()
    model = make_tiny_model(tmp_path / "tiny", "LlamaForCausalLM", dtype="float16")
    calib = tmp_path / "calib.txt"
    calib.write_text(TRAIN_TEXT)
    out = tmp_path / "sel"
    target = "gptq:auto:bits=10:types=int8,fp8,float"
    r = run_cli("convert", str(model), "--to", target, "-o", str(out), "--calib", str(calib),
                "--samples", "4", "--seq-len", "64", "--json")  # fmt: skip
    if r.returncode == 2 and "cannot run" in r.stderr:
        pytest.skip(f"this host's vLLM does not run int8/fp8: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stderr
    auto = json.loads(r.stdout)["artifacts"][0]["auto"]
    sel = auto["selection"]
    cands = sel["candidates"]
    assert sel["chunks"] >= 1 and sel["tokens"] > 0
    assert all(c["measured_kld"] is not None and math.isfinite(c["measured_kld"]) for c in cands)
    uniform = [c for c in cands if c["source"] == "uniform"]
    assert {c["name"] for c in uniform} >= {"uniform-int8", "uniform-fp8"}
    best = min(cands, key=lambda c: c["measured_kld"])
    ref = min(uniform, key=lambda c: c["measured_kld"])
    assert sel["winner"] == best["name"] and sel["best_reference"] == ref["name"]
    assert sel["margin"] == pytest.approx((best["measured_kld"] - ref["measured_kld"])
                                          / ref["measured_kld"]) and sel["margin"] <= 0  # fmt: skip
    # what was written is the winner's plan
    assert auto["predicted_bits"] == best["bits"]
    assert auto["predicted_kld"] == pytest.approx(best["predicted_kld"])
    assert "selection" in r.stderr or "candidates measured" in r.stderr
