"""vLLM's chat rendering of a model folder, without loading the model (run in the vLLM env).

Self-contained (quantkit is not installed in the vLLM environment): ``python chat_vllm.py
JOB.json OUT.json``. JOB holds the folder and the conversations; OUT gets, per conversation, the
prompt ids vLLM's OpenAI chat endpoint would send to the model (``HfRenderer.render_messages``
with the folder's tokenizer and template, the same call the endpoint makes) and the ids vLLM
stops on (a request's ``SamplingParams`` set up as vLLM's input processor does:
``update_from_generation_config`` with the folder's generation config and the tokenizer's eos).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any


def render(folder: str, conversations: list[dict[str, Any]]) -> dict[str, Any]:
    """One folder: prompt ids per conversation, stop ids, template names, token texts."""
    import vllm
    from vllm.engine.arg_utils import EngineArgs
    from vllm.renderers.params import ChatParams
    from vllm.renderers.registry import renderer_from_config
    from vllm.sampling_params import SamplingParams

    config = EngineArgs(model=folder, tokenizer=folder).create_engine_config()
    renderer = renderer_from_config(config)
    tok = renderer.get_tokenizer()
    prompts: dict[str, Any] = {}
    errors: dict[str, str] = {}
    seen: set[int] = set()
    for conv in conversations:
        kwargs = dict(conv["kwargs"])
        if conv.get("tools"):
            kwargs["tools"] = conv["tools"]
        try:
            _, prompt = renderer.render_messages(
                conv["messages"], ChatParams(chat_template_kwargs=kwargs)
            )
            ids = prompt.get("prompt_token_ids")
            if ids is None:  # rendered as text: the endpoint tokenizes without special tokens
                ids = tok(prompt["prompt"], add_special_tokens=False)["input_ids"]
            prompts[conv["name"]] = [int(i) for i in ids]
            seen.update(prompts[conv["name"]])
        except Exception as e:
            prompts[conv["name"]] = None
            lines = str(e).strip().splitlines()
            errors[conv["name"]] = f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]
    params = SamplingParams(max_tokens=1)
    params.update_from_generation_config(
        config.model_config.try_get_generation_config(), renderer.get_eos_token_id()
    )
    stops = set(params.stop_token_ids or [])
    if params.eos_token_id is not None:
        stops.add(params.eos_token_id)
    ct = getattr(tok, "chat_template", None)
    return {
        "version": vllm.__version__,
        "prompts": prompts,
        "errors": errors,
        "stop_ids": sorted(stops),
        "templates": sorted(ct) if isinstance(ct, dict) else (["default"] if ct else []),
        "token_texts": {str(i): str(tok.convert_ids_to_tokens(i)) for i in seen | stops},
    }


def main(job_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    job = json.loads(open(job_path, encoding="utf-8").read())
    results = []
    for folder in job["folders"]:
        try:
            results.append(render(folder, job["conversations"]))
        except Exception as e:  # a folder vLLM cannot read: its error, the others go on
            lines = str(e).strip().splitlines()
            results.append({"error": f"{type(e).__name__}: {lines[0] if lines else ''}"[:200]})
    out = {"folders": results}
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(out, f)
    os.replace(tmp, out_path)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
