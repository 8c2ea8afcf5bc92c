"""llama.cpp as an engine: load a GGUF through llama-cpp-python, get full logits, generate.

This is the in-process core; the validation harness runs it in a subprocess per artifact.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from quantkit.errors import EngineError
from quantkit.quantize.gguf.libllama import llama_cpp, recent_log

KV_F32 = 0  # GGML_TYPE_F32 (ggml.h enum ggml_type)


class LlamaCppModel:
    """A GGUF loaded in llama.cpp with logits for every position."""

    def __init__(
        self,
        path: str | Path,
        *,
        n_ctx: int = 512,
        threads: int | None = None,
        kv_f32: bool = False,
        flash_attn: bool = False,
    ) -> None:
        """``kv_f32``: keep the KV cache in F32 instead of llama.cpp's default F16 — for exactness
        checks against transformers, where an F16 cache alone moves logits by ~1e-3.
        ``flash_attn``: llama.cpp's flash-attention path (llama-perplexity's default, "auto",
        takes it on CPU; llama-cpp-python's default does not)."""
        lib = llama_cpp()
        from llama_cpp import Llama

        self.path = Path(path)
        t0 = time.perf_counter()
        try:
            self.llm = Llama(
                model_path=str(self.path),
                n_ctx=n_ctx,
                n_batch=n_ctx,
                n_ubatch=n_ctx,
                logits_all=True,
                n_threads=threads,
                n_threads_batch=threads,
                verbose=False,
                flash_attn=flash_attn,
                **({"type_k": KV_F32, "type_v": KV_F32} if kv_f32 else {}),
            )
        except (ValueError, RuntimeError) as e:
            why = "; ".join(recent_log(3, errors_only=True)) or str(e)
            raise EngineError(f"llama.cpp could not load {self.path.name}: {why}") from None
        self.load_seconds = time.perf_counter() - t0
        self.n_ctx = n_ctx
        self.n_vocab = lib.llama_vocab_n_tokens(self.llm._model.vocab)

    def tokenize(self, text: str, *, add_bos: bool = True, special: bool = True) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=special)

    def logits(self, tokens: list[int]) -> np.ndarray:
        """Logits (len(tokens) × n_vocab, float32) for one sequence from an empty cache."""
        if len(tokens) > self.n_ctx:
            raise EngineError(f"{len(tokens)} tokens exceed the context of {self.n_ctx}")
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        self.llm.eval(tokens)
        return np.array(self.llm.scores[: len(tokens)], dtype=np.float32)

    def generate(self, prompt: str, n: int = 16) -> tuple[str, float]:
        """Greedy continuation of ``prompt``; returns the text and generation tokens/s."""
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()
        t0 = time.perf_counter()
        out = self.llm.create_completion(prompt, max_tokens=n, temperature=0.0, top_k=1)
        dt = time.perf_counter() - t0
        n_out = out["usage"]["completion_tokens"]
        return out["choices"][0]["text"], n_out / dt if dt > 0 else 0.0

    def set_adapter(self, path: str | Path | None, scale: float = 1.0) -> None:
        """Apply a GGUF LoRA to this context (None removes it). The low-level calls keep the
        base memory-mapped, unlike ``Llama(lora_path=...)`` which turns mmap off (docs/decisions.md), and
        one loaded base can score several adapters in turn."""
        import ctypes

        lib = llama_cpp()
        ctx = self.llm._ctx.ctx
        if path is None:
            lib.llama_set_adapters_lora(ctx, None, 0, None)
            return
        adapter = lib.llama_adapter_lora_init(self.llm._model.model, str(path).encode("utf-8"))
        if not adapter:
            why = "; ".join(recent_log(3, errors_only=True)) or "see the log"
            raise EngineError(f"llama.cpp could not load the LoRA {Path(path).name}: {why}")
        self._adapters = [*getattr(self, "_adapters", []), adapter]
        arr = (lib.llama_adapter_lora_p_ctypes * 1)(adapter)
        scales = (ctypes.c_float * 1)(scale)
        if lib.llama_set_adapters_lora(ctx, arr, 1, scales):
            raise EngineError(f"llama.cpp could not apply the LoRA {Path(path).name}")

    def close(self) -> None:
        if getattr(self, "_adapters", None):
            llama_cpp().llama_set_adapters_lora(self.llm._ctx.ctx, None, 0, None)
        self.llm.close()  # the model frees its adapters with it (llama_model::~llama_model)
