"""A recipe run's context: the recipe with its paths resolved and the content key of every
step (a sha256 over the content of its inputs), plus the small helpers every step shares."""

from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path
from typing import Any

from quantkit.atomic import atomic_output
from quantkit.errors import InputError
from quantkit.hashing import content_sha256
from quantkit.hub import folder_name
from quantkit.recipe import DEFAULT, Recipe, RecipeTarget
from quantkit.targets import GGUFTarget

KEY_VERSION = "2"  # bump when what a key covers changes


def canonical_json(obj: Any) -> str:
    """Sorted keys, fixed indent, trailing newline: the same object always gives the same bytes."""
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False) + "\n"


def content_key(*parts: Any) -> str:
    return hashlib.sha256(canonical_json([KEY_VERSION, *parts]).encode()).hexdigest()[:24]


def is_gguf(t: RecipeTarget) -> bool:
    return isinstance(t.target, GGUFTarget)


class Context:
    """The recipe with its paths resolved and its content keys computed once."""

    def __init__(
        self,
        recipe: Recipe,
        recipe_path: Path,
        *,
        output: Path | None = None,
        model: Path | None = None,
    ) -> None:
        """``output`` / ``model`` override the recipe's (``quantkit demo MODEL -o OUT``)."""
        from quantkit.hashing import model_hash

        if output is not None or model is not None:
            recipe = recipe.model_copy(
                update={
                    "output": str(output) if output is not None else recipe.output,
                    "source": recipe.source.model_copy(
                        update={"model": str(model.absolute()) if model else recipe.source.model}
                    ),
                }
            )
        self.recipe = recipe
        self.recipe_path = recipe_path
        self.base_dir = recipe_path.resolve().parent
        # outputs go where the user runs quantkit (like -o); inputs are found next to the recipe
        self.out = Path(recipe.output).expanduser().absolute()
        self.cache = (
            Path(recipe.cache).expanduser().absolute() if recipe.cache else self.out / ".cache"
        )
        self.model = self._model(recipe.source.model)
        self.model_key = model_hash(self.model)
        # a fine-tune: the base plus a PEFT LoRA adapter, merged into every target
        self.adapter = self._adapter(recipe.source.adapter)
        self.adapter_key = model_hash(self.adapter) if self.adapter else None
        # what the targets are made from: the base's files, plus the adapter's when there is one
        # (without one the keys are the base's alone, so recipes without an adapter keep their cache)
        self.source_key = (
            content_key("lora", self.model_key, self.adapter_key)
            if self.adapter
            else self.model_key
        )
        self.calib = self._text(recipe.calibration.data) if recipe.calibration else None
        self.vdata = self._text(recipe.validation.data) if recipe.validation else None
        # hashed once: every step's key covers them
        self.calib_sha = content_sha256(self.calib) if self.calib else None
        self.vdata_sha = content_sha256(self.vdata) if self.vdata else None
        # artifacts are named like `quantkit convert` names them: after the adapter for a fine-tune
        self.stem = self.adapter.resolve().name if self.adapter else folder_name(self.model)

    def _path(self, p: str) -> Path:
        q = Path(p).expanduser()
        return q if q.is_absolute() else self.base_dir / q

    def _model(self, m: str) -> Path:
        if m == DEFAULT:
            from quantkit.demo import demo_model

            return demo_model()
        p = self._path(m)
        if not p.exists():
            from quantkit.hub import is_hub_id, resolve_model

            if is_hub_id(m):  # a local folder of that spelling would have won
                p = resolve_model(m)
        if not (p / "config.json").is_file():
            raise InputError(f"source.model: {p} is not a Hugging Face model folder")
        return p

    def _adapter(self, a: str | None) -> Path | None:
        if a is None:
            return None
        from quantkit.convert.lora import LoraAdapter

        p = self._path(a)
        if not p.is_dir():
            raise InputError(f"source.adapter: {p} is not a PEFT adapter folder")
        LoraAdapter.open(p).close()  # refuses a bad adapter (DoRA, missing files...) up front
        return p

    def hf_model(self) -> Path:
        """The HF checkpoint that torch-side steps load (imatrix, llm-compressor): the model
        itself, or for a fine-tune the merged copy in the cache."""
        return self.merged_path() if self.adapter else self.model

    def _text(self, d: str) -> Path:
        if d == DEFAULT:
            from quantkit.demo import DEMO_TEXT

            p = self.cache / "texts" / "demo.txt"
            if not p.is_file():
                p.parent.mkdir(parents=True, exist_ok=True)
                with atomic_output(p, force=True) as tmp:
                    tmp.write_text(DEMO_TEXT, encoding="utf-8")
            return p
        p = self._path(d)
        if not p.is_file():
            raise InputError(f"{p}: text not found")
        return p

    @cached_property
    def base_type(self) -> str:
        """The float GGUF base quantized targets are made from: by the rule ``convert`` follows
        (quantize/gguf/types.py ``base_type``), so a recipe and the CLI make the same bytes."""
        from quantkit.checkpoint import Checkpoint
        from quantkit.quantize.gguf.types import base_type

        with Checkpoint.open(self.model) as ckpt:
            return base_type(ckpt.source_dtype)

    def uses_base(self, tg: Any) -> bool:
        """A GGUF target made from the cached float base: the base itself (copied), every
        quantized type and gguf:auto; the other float types are written from the source."""
        return isinstance(tg, GGUFTarget) and (
            tg.is_auto or tg.gguf_type.quantized or tg.type == self.base_type
        )

    # --- keys and paths of every step -------------------------------------------------------
    def base_key(self) -> str:
        return content_key(f"base-{self.base_type}", self.source_key)

    def merged_key(self) -> str:
        return content_key("merged", self.source_key)

    def merged_path(self) -> Path:
        return self.cache / f"merged-{self.merged_key()}" / self.stem

    def base_path(self) -> Path:
        return self.cache / f"base-{self.base_key()}" / f"{self.stem}-{self.base_type}.gguf"

    def imatrix_key(self) -> str:
        c = self.recipe.calibration
        assert c is not None and self.calib is not None
        return content_key("imatrix", self.source_key, self.calib_sha, c.ctx, c.chunks)

    def imatrix_path(self) -> Path:
        return self.cache / f"imatrix-{self.imatrix_key()}.gguf"

    def target_key(self, t: RecipeTarget) -> str:
        tg = t.target
        opts = tg.model_dump(exclude_none=True)
        if not isinstance(tg, GGUFTarget):
            calib = None
            if getattr(tg, "needs_calibration", False):
                c = self.recipe.calibration
                if c is None or self.calib is None:
                    raise InputError(f"targets: {t.name}: needs a calibration section")
                calib = [self.calib_sha, c.samples, c.ctx]
            return content_key(tg.method, self.source_key, opts, calib)
        if tg.is_auto:  # the probe text the per-kind gains are measured on
            opts["probe"] = self.calib_sha
        return content_key(
            "gguf", self.base_key(), opts, self.imatrix_key() if tg.imatrix else None
        )

    def target_dir(self, t: Any) -> Path:
        return self.out / t.name

    def artifact_path(self, t: RecipeTarget) -> Path:
        suffix = ".gguf" if is_gguf(t) else ""
        return self.target_dir(t) / f"{self.stem}-{t.target.label()}{suffix}"

    def validation_key(self, t: RecipeTarget) -> str:
        v = self.recipe.validation
        assert v is not None and self.vdata is not None
        gates = self.recipe.gates.merged(t.gates)
        return content_key(
            "validate", self.target_key(t), self.source_key, self.vdata_sha,
            v.model_dump(), gates.model_dump(),
        )  # fmt: skip


def read_manifest(d: Path) -> dict[str, Any] | None:
    try:
        return json.loads((d / "manifest.json").read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path, force=True) as tmp:
        tmp.write_text(text, encoding="utf-8")


MERGED_MARK = "quantkit-merged.json"  # written last: a merged folder without it is incomplete
