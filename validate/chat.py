"""Chat conformance: the prompt ids and the stop tokens a served artifact gets, against its source.

A fixed set of conversations is rendered by the reference (transformers' ``apply_chat_template``
on the source checkpoint, tokenized as transformers does: ``add_special_tokens=False``) and by
each artifact's own serving path:

* GGUF: the template(s) stored in the file, read by llama.cpp (``llama_model_chat_template``:
  ``tokenizer.chat_template``, and ``tokenizer.chat_template.tool_use`` for requests with tools,
  as llama-server picks them), rendered by llama.cpp's own template engine (``common/jinja``,
  entered as llama-server enters it: message normaliser, ``enable_thinking`` default) through
  the ``ggufdoctor`` package's WebAssembly build of it, then tokenized by the GGUF in llama.cpp
  as llama-server does (the template's leading BOS text dropped when the vocabulary adds BOS,
  then ``add_special`` and ``parse_special``). Without ggufdoctor, llama-cpp-python's own
  server formatter (``Jinja2ChatFormatter``: jinja2, tokenized with ``special=True`` and no BOS
  added) renders instead, and the report names which one ran.
* vLLM folders: vLLM's chat endpoint renderer (``HfRenderer.render_messages``) on the
  artifact folder's tokenizer, in the vLLM environment, without loading the model
  (``validate/chat_vllm.py``).
* Plain HF folders scored by transformers: transformers on the artifact folder.

Stops: every id the source declares as a stop (tokenizer_config.json's eos, config.json's and
generation_config.json's ``eos_token_id``, int or list) must end generation in the engine:
llama.cpp's end-of-generation set (``llama_vocab_is_eog``, what its sampling loop and
llama-server stop on), vLLM's request stop set (``SamplingParams.update_from_generation_config``
with the tokenizer's eos, as vLLM's input processor sets it up).

Nothing here executes code from the model folder other than its chat template, which every
engine renders in a sandbox (jinja2's ``ImmutableSandboxedEnvironment``, or WebAssembly).
"""

from __future__ import annotations

import ctypes
import json
import logging
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from quantkit.checkpoint import json_or_none

logger = logging.getLogger(__name__)

# A tool schema in the OpenAI form every engine takes (transformers, llama.cpp, vLLM).
WEATHER_TOOL: dict[str, Any] = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name."}},
            "required": ["city"],
        },
    },
}


@dataclass(frozen=True)
class Conversation:
    """One request as a chat endpoint receives it."""

    name: str
    messages: tuple[dict[str, Any], ...]
    add_generation_prompt: bool = True
    tools: tuple[dict[str, Any], ...] | None = None
    # chat_template_kwargs: reasoning switches (Qwen3's enable_thinking)
    kwargs: dict[str, Any] = field(default_factory=dict)

    def template_kwargs(self) -> dict[str, Any]:
        return {"add_generation_prompt": self.add_generation_prompt, **self.kwargs}


_SYSTEM = {"role": "system", "content": "You are a concise assistant."}
_USER = {"role": "user", "content": "Name three colours of the rainbow."}
_ANSWER = {"role": "assistant", "content": "Red, orange and yellow."}
_USER2 = {"role": "user", "content": "And the last one?"}
_TOOL_USER = {"role": "user", "content": "What is the weather in Paris?"}
_TOOL_CALL = {
    "role": "assistant",
    "content": "",
    "tool_calls": [
        {
            "id": "call0abc1",  # 9 alphanumerics: Mistral's templates require exactly that
            "type": "function",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
        }
    ],
}
_TOOL_RESULT = {
    "role": "tool",
    "tool_call_id": "call0abc1",
    "name": "get_weather",
    "content": '{"temperature_c": 18}',
}

# The fixed set. A template that refuses one (e.g. no system role, no tool role) makes that
# conversation "not applicable": the reference cannot render it either, so nothing to compare.
CONVERSATIONS: tuple[Conversation, ...] = (
    Conversation("user", (_USER,)),
    Conversation("system+user", (_SYSTEM, _USER)),
    Conversation("multi-turn", (_SYSTEM, _USER, _ANSWER, _USER2)),
    Conversation("no-generation-prompt", (_USER, _ANSWER), add_generation_prompt=False),
    Conversation("tools", (_SYSTEM, _TOOL_USER), tools=(WEATHER_TOOL,)),
    Conversation(
        "tool-call-round-trip", (_TOOL_USER, _TOOL_CALL, _TOOL_RESULT), tools=(WEATHER_TOOL,)
    ),
    Conversation("thinking-on", (_USER,), kwargs={"enable_thinking": True}),
    Conversation("thinking-off", (_USER,), kwargs={"enable_thinking": False}),
)


# --------------------------------------------------------------------------------------------
# The source: what transformers renders, and the stop ids it declares
# --------------------------------------------------------------------------------------------


@dataclass
class Reference:
    """The source checkpoint's prompts (conversation name → ids, or None: not applicable) and
    its declared stop ids."""

    prompts: dict[str, list[int] | None]
    skipped: dict[str, str]  # conversation name → why the source template refuses it
    stop_ids: list[int]
    token_text: Callable[[int], str]
    has_template: bool


def declared_stop_ids(model_dir: Path, token_id: Callable[[str], int | None]) -> list[int]:
    """Every id the checkpoint declares as a stop, in file order and without repeats:
    tokenizer_config.json's eos token, config.json's (and its text_config's) and
    generation_config.json's ``eos_token_id`` (an int or a list)."""
    out: list[int] = []

    def add(v: Any) -> None:
        for x in v if isinstance(v, list) else [v]:
            if isinstance(x, int) and not isinstance(x, bool) and x >= 0 and x not in out:
                out.append(x)

    tcfg = json_or_none(model_dir / "tokenizer_config.json") or {}
    eos = tcfg.get("eos_token")
    eos = eos.get("content") if isinstance(eos, dict) else eos
    if isinstance(eos, str):
        add(token_id(eos))
    config = json_or_none(model_dir / "config.json") or {}
    for cfg in (config, config.get("text_config") or {}):
        add(cfg.get("eos_token_id"))
    add((json_or_none(model_dir / "generation_config.json") or {}).get("eos_token_id"))
    return out


def _hf_tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))


def render_transformers(tok: Any, conv: Conversation) -> list[int]:
    """transformers' prompt ids for ``conv`` (apply_chat_template: render, then tokenize with
    ``add_special_tokens=False``)."""
    text = tok.apply_chat_template(
        [dict(m) for m in conv.messages],
        tools=list(conv.tools) if conv.tools else None,
        tokenize=False,
        **conv.template_kwargs(),
    )
    return list(tok(text, add_special_tokens=False)["input_ids"])


def reference(model_dir: Path, stop_dirs: Sequence[Path] = ()) -> Reference:
    """Render every conversation with the source checkpoint's tokenizer and template; stop ids
    from ``model_dir`` and ``stop_dirs`` (a fine-tune's adapter folder holds the tokenizer, its
    base the generation config)."""
    tok = _hf_tokenizer(model_dir)
    prompts: dict[str, list[int] | None] = {}
    skipped: dict[str, str] = {}
    has_template = bool(getattr(tok, "chat_template", None))
    for conv in CONVERSATIONS if has_template else ():
        try:
            prompts[conv.name] = render_transformers(tok, conv)
        except Exception as e:  # the template's raise_exception, or a shape it cannot handle
            prompts[conv.name] = None
            skipped[conv.name] = _one_line(e)
    vocab = tok.get_vocab()
    stops: list[int] = []
    for d in (model_dir, *stop_dirs):
        stops += [t for t in declared_stop_ids(Path(d), vocab.get) if t not in stops]
    return Reference(
        prompts,
        skipped,
        stops,
        lambda i: str(tok.convert_ids_to_tokens(int(i))),
        has_template,
    )


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


# --------------------------------------------------------------------------------------------
# Engines' renderings
# --------------------------------------------------------------------------------------------


@dataclass
class Rendered:
    """An engine's prompt ids per conversation (None: it failed, with the reason in errors),
    the source stop ids it does not stop on, and how it rendered."""

    prompts: dict[str, list[int] | None]
    errors: dict[str, str]
    missing_stops: list[int]
    token_text: Callable[[int], str]
    renderer: str
    templates: list[str]  # template names the artifact carries ("default", "tool_use", ...)


def _llama_server_renderer() -> tuple[Any, str] | None:
    """ggufdoctor's build of llama.cpp's template engine, or None when it cannot run here."""
    try:
        from ggufdoctor.engines.llamacpp_engine import LlamaCppEngine
    except Exception:
        return None
    engine = LlamaCppEngine()
    if not engine.available:
        logger.info("ggufdoctor's llama.cpp engine is unavailable: %s", engine.unavailable_reason)
        return None
    return engine, f"llama.cpp {engine.version} common/jinja (ggufdoctor)"


def render_gguf(path: Path, ref: Reference) -> Rendered:
    """The GGUF's own templates, rendered as llama-server renders them and tokenized by the
    GGUF's vocabulary in llama.cpp; stop ids checked against llama.cpp's end-of-generation set."""
    from llama_cpp import Llama

    from quantkit.quantize.gguf.libllama import llama_cpp

    lib = llama_cpp()
    llm = Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        model, vocab = llm._model.model, llm._model.vocab
        n_vocab = lib.llama_vocab_n_tokens(vocab)

        def piece(tid: int) -> str:  # common_token_to_piece(vocab, id, special=true)
            buf = ctypes.create_string_buffer(256)
            n = lib.llama_token_to_piece(vocab, tid, buf, len(buf), 0, True)
            return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

        def template(name: bytes | None) -> str | None:
            raw = lib.llama_model_chat_template(model, name)
            return raw.decode("utf-8") if raw else None

        default, tool_use = template(None), template(b"tool_use")
        templates = [n for n, t in (("default", default), ("tool_use", tool_use)) if t]
        bos_id, eos_id = lib.llama_vocab_bos(vocab), lib.llama_vocab_eos(vocab)
        bos = piece(bos_id) if bos_id >= 0 else ""
        eos = piece(eos_id) if eos_id >= 0 else ""
        add_bos = bool(lib.llama_vocab_get_add_bos(vocab))
        add_eos = bool(lib.llama_vocab_get_add_eos(vocab))
        server = _llama_server_renderer()
        renderer = server[1] if server else "llama-cpp-python Jinja2ChatFormatter"
        prompts: dict[str, list[int] | None] = {}
        errors: dict[str, str] = {}
        for conv in CONVERSATIONS:
            if ref.prompts.get(conv.name) is None:
                continue
            # llama-server: the tool_use template for a request with tools, when the file has
            # one; the default otherwise (common_chat_templates_apply); ChatML when neither
            src = tool_use if conv.tools and tool_use else (default or tool_use)
            if src is None:
                errors[conv.name] = "the GGUF has no chat template"
                prompts[conv.name] = None
                continue
            try:
                if server:
                    ctx = {
                        "messages": [dict(m) for m in conv.messages],
                        "bos_token": bos,
                        "eos_token": eos,
                        **conv.template_kwargs(),
                    }
                    if conv.tools:
                        ctx["tools"] = list(conv.tools)
                    res = server[0].render(src, ctx)
                    if res.error is not None:
                        raise ValueError(res.error)
                    text = res.text
                    # common/chat.cpp common_chat_template_direct_apply_impl
                    if add_bos and bos and text.startswith(bos):
                        text = text[len(bos) :]
                    if add_eos and eos and text.endswith(eos):
                        text = text[: -len(eos)]
                    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)
                else:
                    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

                    fmt = Jinja2ChatFormatter(
                        src, eos, bos, add_generation_prompt=conv.add_generation_prompt
                    )
                    out = fmt(
                        messages=[dict(m) for m in conv.messages],  # type: ignore[misc]
                        tools=list(conv.tools) if conv.tools else None,  # type: ignore[arg-type]
                        **conv.kwargs,
                    )
                    ids = llm.tokenize(out.prompt.encode("utf-8"), add_bos=False, special=True)
                prompts[conv.name] = [int(i) for i in ids]
            except Exception as e:
                prompts[conv.name] = None
                errors[conv.name] = _one_line(e)
        missing = [
            t for t in ref.stop_ids if not (0 <= t < n_vocab and lib.llama_vocab_is_eog(vocab, t))
        ]

        def spelling(tid: int) -> str:  # the vocabulary's spelling, as transformers shows it
            raw = lib.llama_vocab_get_text(vocab, tid) if 0 <= tid < n_vocab else None
            return raw.decode("utf-8", errors="replace") if raw else str(tid)

        # texts are read now: the vocabulary is freed when the model closes
        seen = {t for ids in prompts.values() for t in ids or []} | set(ref.stop_ids)
        texts = {t: spelling(t) for t in seen}

        return Rendered(
            prompts, errors, missing, lambda i: texts.get(i, str(i)), renderer, templates
        )
    finally:
        llm.close()


def render_transformers_folder(folder: Path, ref: Reference) -> Rendered:
    """An HF folder served by transformers: its own tokenizer and template; its stops are what
    its generation_config.json / config.json / tokenizer declare (what ``generate`` stops on)."""
    tok = _hf_tokenizer(folder)
    prompts: dict[str, list[int] | None] = {}
    errors: dict[str, str] = {}
    for conv in CONVERSATIONS:
        if ref.prompts.get(conv.name) is None:
            continue
        try:
            prompts[conv.name] = render_transformers(tok, conv)
        except Exception as e:
            prompts[conv.name] = None
            errors[conv.name] = _one_line(e)
    own = set(declared_stop_ids(folder, tok.get_vocab().get))
    missing = [t for t in ref.stop_ids if t not in own]
    ct = getattr(tok, "chat_template", None)
    names = sorted(ct) if isinstance(ct, dict) else (["default"] if ct else [])
    text = lambda i: str(tok.convert_ids_to_tokens(int(i)))  # noqa: E731
    return Rendered(prompts, errors, missing, text, "transformers apply_chat_template", names)


VLLM_SCRIPT = Path(__file__).with_name("chat_vllm.py")


def render_vllm(
    folders: Sequence[Path], ref: Reference, timeout: float = 600
) -> dict[Path, Rendered | str]:
    """vLLM's chat endpoint renderer on each folder's tokenizer, in the vLLM environment,
    without loading a model (validate/chat_vllm.py); one process for all folders (importing
    vLLM takes ~30 s). Per folder its rendering, or the one-line error its renderer raised."""
    from quantkit import envs

    python = envs.python("vllm")
    convs = [
        {
            "name": c.name,
            "messages": [dict(m) for m in c.messages],
            "tools": list(c.tools) if c.tools else None,
            "kwargs": c.template_kwargs(),
        }
        for c in CONVERSATIONS
        if ref.prompts.get(c.name) is not None
    ]
    with tempfile.TemporaryDirectory(prefix="quantkit-chat-") as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"folders": [str(f) for f in folders], "conversations": convs}))
        proc = subprocess.run(
            [str(python), str(VLLM_SCRIPT), str(job), str(out)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=_vllm_env(),
        )
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise RuntimeError(f"vLLM's renderer failed: {tail[0]}")
        results = json.loads(out.read_text())["folders"]
    done: dict[Path, Rendered | str] = {}
    for folder, res in zip(folders, results, strict=True):
        if "error" in res:
            done[folder] = res["error"]
            continue
        stops = set(res["stop_ids"])
        texts: dict[str, str] = res["token_texts"]
        done[folder] = Rendered(
            res["prompts"],
            res["errors"],
            [t for t in ref.stop_ids if t not in stops],
            lambda i, texts=texts: texts.get(str(i), str(i)),
            f"vLLM {res['version']} HfRenderer.render_messages",
            res["templates"],
        )
    return done


def _vllm_env() -> dict[str, str]:
    import os

    # no Hub, no usage stats: the folder is local and nothing is downloaded
    return {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1"}


# --------------------------------------------------------------------------------------------
# Comparison → the report's ``chat`` section
# --------------------------------------------------------------------------------------------


def compare(ref: Reference, got: Rendered) -> dict[str, Any]:
    """The report's ``chat`` section for one artifact (docs/report-schema.md)."""
    mismatches: list[dict[str, Any]] = []
    checked = matched = 0
    for name, want in ref.prompts.items():
        if want is None:
            continue
        checked += 1
        have = got.prompts.get(name)
        if have is None:
            mismatches.append({"conversation": name, "error": got.errors.get(name, "not rendered")})
            continue
        if have == want:
            matched += 1
            continue
        pos = next(
            (i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b),
            min(len(want), len(have)),
        )
        mismatches.append(
            {
                "conversation": name,
                "position": pos,
                "reference_token": _tok(ref.token_text, want, pos),
                "engine_token": _tok(got.token_text, have, pos),
                "reference_len": len(want),
                "engine_len": len(have),
            }
        )
    missing = [{"id": t, "token": ref.token_text(t)} for t in got.missing_stops]
    return {
        "renderer": got.renderer,
        "templates": got.templates,
        "conversations": checked,
        "matched": matched,
        "not_applicable": dict(ref.skipped),
        "mismatches": mismatches,
        "stop_ids": list(ref.stop_ids),
        "missing_stop_ids": missing,
        "passed": not mismatches and not missing,
    }


def _tok(text: Callable[[int], str], ids: Sequence[int], pos: int) -> str | None:
    return text(ids[pos]) if pos < len(ids) else None


def check(artifact: Path, engine: str, ref: Reference) -> dict[str, Any]:
    """The ``chat`` section of one artifact scored by ``engine`` ("llama.cpp", "vllm",
    "transformers"); a renderer that cannot run gives ``{"error": ...}`` and fails the check."""
    return check_all([(artifact, engine)], ref)[0]


def check_all(artifacts: Sequence[tuple[Path, str]], ref: Reference) -> list[dict[str, Any]]:
    """``check`` for several (artifact, engine) pairs; the vLLM ones share one vLLM process."""
    vllm: dict[Path, Rendered | str] = {}
    folders = [a for a, e in artifacts if e == "vllm"]
    if folders:
        try:
            vllm = render_vllm(folders, ref)
        except Exception as e:
            vllm = dict.fromkeys(folders, _one_line(e))
    out = []
    for artifact, engine in artifacts:
        try:
            if engine == "llama.cpp":
                got: Rendered | str = render_gguf(artifact, ref)
            elif engine == "vllm":
                got = vllm[artifact]
            else:
                got = render_transformers_folder(artifact, ref)
        except Exception as e:
            got = _one_line(e)
        out.append({"error": got, "passed": False} if isinstance(got, str) else compare(ref, got))
    return out


def summary(section: dict[str, Any] | None) -> str:
    """The table's chat cell: "8/8", "7/8 !stop", "error", or "" (not checked)."""
    if not section:
        return ""
    if "error" in section:
        return "error"
    cell = f"{section['matched']}/{section['conversations']}"
    return cell + (" !stop" if section["missing_stop_ids"] else "")


def findings(name: str, section: dict[str, Any]) -> list[str]:
    """One line per difference, for the terminal and Markdown notes."""
    if "error" in section:
        return [f"{name}: chat check could not run: {section['error']}"]
    out = []
    for m in section["mismatches"]:
        if "error" in m:
            out.append(f"{name}: chat '{m['conversation']}' not rendered: {m['error']}")
        else:
            out.append(
                f"{name}: chat '{m['conversation']}' differs at token {m['position']}: "
                f"reference {m['reference_token']!r}, engine {m['engine_token']!r} "
                f"({m['reference_len']} vs {m['engine_len']} tokens)"
            )
    for s in section["missing_stop_ids"]:
        out.append(
            f"{name}: stop id {s['id']} {s['token']!r} does not end generation in the engine"
        )
    return out
