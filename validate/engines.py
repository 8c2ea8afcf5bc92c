"""Engines behind one interface: how each one's worker runs, the options it takes, how its result
becomes report figures — and, for the engines quantkit's own worker loads, load / score / speed /
unload.

An engine scores *the harness's* token ids (one tokenization, one chunking) and returns, for every
scored position, the log-probabilities of the next token: the full distribution (llama.cpp,
transformers → exact KLD) or only the top-k plus the target (an engine such as vLLM that returns
``prompt_logprobs`` → approximate KLD, labelled as such). Engines run inside a worker process,
never in the harness's own process, so an engine that crashes or hangs fails only its artifact.

Every engine is an ``Engine``; the harness and the runner ask it rather than test its name:
``worker_command`` (which interpreter runs which worker), ``job_options`` (from the validate
settings), ``finish`` (the worker's result → quality figures) and ``artifact_format``.

- A ``ModelEngine`` is loaded by quantkit's worker (``quantkit.validate.worker``) in quantkit's
  environment. Adding one: subclass it, set ``name`` and ``distribution`` ("top-k" when only
  ``prompt_logprobs`` come back: return ``Scored(topk_ids=…, topk_logprobs=…,
  target_logprobs=…)``, top-k sorted by decreasing log-prob), register it in ``ENGINES`` and
  teach ``Described.engine`` (validate/describe.py) which artifacts it takes.
- An engine that lives in another virtual environment (vLLM: its pins clash with quantkit's and
  llm-compressor's, see ``quantkit/envs.py``) sets ``env`` and ``script``: a self-contained script
  run with that environment's interpreter (quantkit is not installed there) that speaks the same
  job protocol (JSON job, ``.npy`` chunk ids, ``progress``, ``result.json``) and returns raw top-k
  arrays, which its ``finish`` turns into figures with the metric code every engine shares.
"""

from __future__ import annotations

import sys
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from quantkit.validate.describe import LLAMA_CPP, TRANSFORMERS, VLLM, describe
from quantkit.validate.describe import is_lora_dir as is_lora_dir  # the harness reads it here

if TYPE_CHECKING:
    from quantkit.validate.harness import Settings


def log_softmax32(logits: np.ndarray) -> np.ndarray:
    """log-softmax along the last axis in float32 (max-shifted; error ~1e-7 relative)."""
    x = np.asarray(logits, dtype=np.float32)
    m = x.max(axis=-1, keepdims=True)
    x = x - m
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True, dtype=np.float64)).astype(np.float32)


@dataclass
class Scored:
    """Log-probabilities of the next token at the scored positions of one chunk.

    Either ``logprobs`` (positions × vocab, full distribution) or ``topk_ids``/``topk_logprobs``
    (positions × k) plus ``target_logprobs`` (positions,) is set.
    """

    logprobs: np.ndarray | None = None
    topk_ids: np.ndarray | None = None
    topk_logprobs: np.ndarray | None = None
    target_logprobs: np.ndarray | None = None


class Engine(ABC):
    """One inference engine as the harness sees it: its worker, its options, its figures."""

    name: ClassVar[str]
    distribution: ClassVar[str] = "full"  # "full" | "top-k"
    artifact_format: ClassVar[str] = "hf"  # the report's "format" of the artifacts it runs
    env: ClassVar[str | None] = None  # quantkit.envs environment of its worker; None: quantkit's
    script: ClassVar[Path | None] = None  # self-contained worker run in ``env``

    @classmethod
    def worker_command(cls, job_file: Path) -> list[str]:
        """The process that carries out the job in ``job_file``."""
        if cls.script is None:
            return [sys.executable, "-m", "quantkit.validate.worker", str(job_file)]
        from quantkit import envs

        assert cls.env is not None, f"{cls.name}: a worker script runs in an environment"
        return [str(envs.python(cls.env)), str(cls.script), str(job_file)]

    @classmethod
    def job_options(cls, s: Settings) -> dict[str, Any]:
        """The engine options of an artifact job, from the validate settings."""
        return {}

    @classmethod
    def finish(cls, job: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
        """The worker's successful result as the report takes it (figures already there)."""
        return res


class ModelEngine(Engine):
    """An engine quantkit's worker loads, holding one model."""

    def __init__(self, path: str | Path, *, n_ctx: int, threads: int, **options: Any) -> None:
        self.path = Path(path)
        self.n_ctx = n_ctx
        self.threads = threads
        self.options = options
        self.load_seconds = 0.0

    @abstractmethod
    def load(self) -> None: ...

    @abstractmethod
    def version(self) -> str: ...

    def describe(self) -> dict[str, Any]:
        """Engine settings worth recording next to the figures (dtype, device, KV type)."""
        return {}

    def tokenize(self, text: str) -> tuple[list[int], bool] | None:
        """The engine's own tokenization of ``text`` (without BOS) and whether it adds a BOS;
        None when the engine uses the reference tokenizer."""
        return None

    @abstractmethod
    def score(self, chunk: list[int], first: int) -> Scored:
        """Log-probs of tokens ``chunk[first+1:]`` given their prefixes (positions first … n−2)."""

    @abstractmethod
    def speed(self, tokens: list[int], pp: int, tg: int) -> dict[str, float | None]:
        """llama-bench style: pp tokens in one batch from an empty cache, then tg tokens one by one
        from an empty cache. Returns ``pp_tps`` and ``tg_tps``."""

    @abstractmethod
    def unload(self) -> None: ...


class LlamaCppEngine(ModelEngine):
    """A GGUF in llama.cpp (llama-cpp-python), full logits, only the scored positions computed
    (as llama-perplexity asks for them)."""

    name = LLAMA_CPP
    artifact_format = "gguf"

    @classmethod
    def job_options(cls, s: Settings) -> dict[str, Any]:
        return {"kv_f32": s.kv_f32, "flash_attn": s.flash_attn}

    @classmethod
    def audit(cls, path: str | Path) -> dict[str, Any] | None:
        """The GGUF's types, size and fallbacks (quantize/gguf/audit.py) for the report's size block."""
        from quantkit.quantize.gguf.audit import audit

        a = audit(path)
        return {
            "file_type": a.file_type,
            "n_params": a.n_params,
            "tensor_bytes": a.tensor_bytes,
            "bits_per_weight": a.bpw,
            "type_histogram": a.histogram,
            "fallbacks": len(a.fallbacks),
        }

    def load(self) -> None:
        from quantkit.validate.llamacpp import LlamaCppModel

        self.model = LlamaCppModel(
            self.path,
            n_ctx=self.n_ctx,
            threads=self.threads,
            kv_f32=bool(self.options.get("kv_f32")),
            flash_attn=bool(self.options.get("flash_attn", True)),
        )
        if self.options.get("lora"):  # a GGUF LoRA artifact, applied on this base
            self.model.set_adapter(self.options["lora"])
        self.load_seconds = self.model.load_seconds
        from quantkit.quantize.gguf.libllama import llama_cpp

        self.lib = llama_cpp()
        self.ctx = self.model.llm._ctx.ctx
        self.batch = self.lib.llama_batch_init(self.n_ctx, 0, 1)

    def version(self) -> str:
        import importlib.metadata

        return f"llama-cpp-python {importlib.metadata.version('llama-cpp-python')}"

    def describe(self) -> dict[str, Any]:
        return {
            "kv_cache": "F32" if self.options.get("kv_f32") else "F16",
            "flash_attn": bool(self.options.get("flash_attn", True)),
        }

    def tokenize(self, text: str) -> tuple[list[int], bool] | None:
        llm = self.model.llm
        add_bos = bool(llm._model.add_bos_token()) if hasattr(llm._model, "add_bos_token") else True
        return self.model.tokenize(text, add_bos=False, special=False), add_bos

    def _clear(self) -> None:
        self.model.llm._ctx.kv_cache_clear()

    def _decode(self, tokens: list[int], pos0: int, out_from: int | None) -> int:
        b = self.batch
        n = len(tokens)
        b.n_tokens = n
        for i, t in enumerate(tokens):
            b.token[i] = t
            b.pos[i] = pos0 + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = out_from is not None and out_from <= i < n - 1
        if out_from is None:
            b.logits[n - 1] = True
        rc = self.lib.llama_decode(self.ctx, b)
        if rc != 0:
            from quantkit.errors import EngineError

            raise EngineError(f"llama_decode returned {rc}")
        return rc

    def score(self, chunk: list[int], first: int) -> Scored:
        n = len(chunk)
        self._clear()
        self._decode(chunk, 0, first)
        ptr = self.lib.llama_get_logits(self.ctx)
        logits = np.ctypeslib.as_array(ptr, shape=(n - 1 - first, self.model.n_vocab))
        return Scored(logprobs=log_softmax32(logits))

    def speed(self, tokens: list[int], pp: int, tg: int) -> dict[str, float | None]:
        toks = (tokens * (1 + max(pp, tg) // max(1, len(tokens))))[: max(pp, tg)]
        out: dict[str, float | None] = {"pp_tps": None, "tg_tps": None}
        if pp > 0:
            self._clear()
            t0 = time.perf_counter()
            self._decode(toks[:pp], 0, None)
            out["pp_tps"] = pp / (time.perf_counter() - t0)
        if tg > 0:
            self._clear()
            t0 = time.perf_counter()
            for i in range(tg):
                self._decode([toks[i]], i, None)
            out["tg_tps"] = tg / (time.perf_counter() - t0)
        return out

    def unload(self) -> None:
        if getattr(self, "batch", None) is not None:
            self.lib.llama_batch_free(self.batch)
            self.batch = None
        self.model.close()


class TransformersEngine(ModelEngine):
    """An HF checkpoint in transformers on CPU (CUDA when present), eager attention, in the
    checkpoint's own dtype unless ``dtype`` is given."""

    name = TRANSFORMERS

    def load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(self.threads)
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        stored, compute = self._dtypes(torch)
        t0 = time.perf_counter()
        self.model = (
            AutoModelForCausalLM.from_pretrained(
                self.path, dtype=stored or compute or "auto", attn_implementation="eager"
            )
            .to(self.device)
            .eval()
        )
        if self.options.get("adapter"):  # the fine-tune: base + PEFT adapter
            from peft import PeftModel

            self.model = PeftModel.from_pretrained(self.model, self.options["adapter"]).eval()
        self.compute_dtype = compute or self.model.dtype
        if self.device == "cpu" and compute is not None and compute != stored:
            # the weights stay views of the files; each module runs in the asked dtype
            from quantkit.torch_dtype import compute_in

            compute_in(self.model, compute)
        self.load_seconds = time.perf_counter() - t0
        self.torch = torch

    def _dtypes(self, torch: Any) -> tuple[Any, Any]:
        """(the dtype every weight is stored in, when there is one and the model runs on CPU;
        the dtype to compute in: ``dtype`` asked, else the config's, else None for transformers'
        own choice)."""
        from quantkit.checkpoint import FLOAT_DTYPES, Checkpoint, json_or_none
        from quantkit.errors import QuantkitError

        asked = self.options.get("dtype")
        cfg = json_or_none(Path(self.path) / "config.json") or {}
        named = asked or cfg.get("dtype") or cfg.get("torch_dtype")
        compute = getattr(torch, named, None) if isinstance(named, str) else None
        if self.device != "cpu" or not Path(self.path).is_dir():
            return None, compute
        try:
            with Checkpoint.open(Path(self.path)) as ck:
                kinds = {t.dtype for t in ck.tensors.values() if t.dtype in FLOAT_DTYPES}
        except QuantkitError:  # not a safetensors folder: transformers loads it as it can
            return None, compute
        if len(kinds) != 1:  # mixed (F32 norms beside BF16 matrices): one load dtype would round
            return None, compute
        stored = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(*kinds)
        return stored, compute

    def version(self) -> str:
        import transformers

        return f"transformers {transformers.__version__}, torch {self.torch.__version__}"

    def describe(self) -> dict[str, Any]:
        return {"dtype": str(self.compute_dtype).replace("torch.", ""), "device": self.device}

    def score(self, chunk: list[int], first: int) -> Scored:
        torch = self.torch
        with torch.no_grad():
            ids = torch.tensor([chunk], device=self.device)
            logits = self.model(ids).logits[0, first : len(chunk) - 1].float().cpu().numpy()
        return Scored(logprobs=log_softmax32(logits))

    def speed(self, tokens: list[int], pp: int, tg: int) -> dict[str, float | None]:
        torch = self.torch
        toks = (tokens * (1 + max(pp, tg) // max(1, len(tokens))))[: max(pp, tg)]
        out: dict[str, float | None] = {"pp_tps": None, "tg_tps": None}
        with torch.no_grad():
            if pp > 0:
                t0 = time.perf_counter()
                self.model(torch.tensor([toks[:pp]], device=self.device), use_cache=False)
                out["pp_tps"] = pp / (time.perf_counter() - t0)
            if tg > 0:
                past = None
                t0 = time.perf_counter()
                for i in range(tg):
                    r = self.model(
                        torch.tensor([[toks[i]]], device=self.device),
                        past_key_values=past,
                        use_cache=True,
                    )
                    past = r.past_key_values
                out["tg_tps"] = tg / (time.perf_counter() - t0)
        return out

    def unload(self) -> None:
        del self.model


class MemoryEngine(TransformersEngine):
    """A transformers (or peft) model already loaded in this process, scored where it is: the
    reference of ``quantkit.export(model_in_memory, validate=...)``, which has no folder a worker
    could load. Runs in the model's own dtype, device and attention implementation; switched to
    eval mode while scoring and back afterwards. The caller's thread count is left alone."""

    def __init__(self, model: Any, *, n_ctx: int, threads: int, **options: Any) -> None:
        super().__init__("<memory>", n_ctx=n_ctx, threads=threads, **options)
        self._given = model

    def load(self) -> None:
        import torch

        self.torch = torch
        self.model = self._given
        self._was_training = bool(self.model.training)
        self.model.eval()
        self.device = str(next(self.model.parameters()).device)
        self.compute_dtype = self.model.dtype

    def unload(self) -> None:
        self.model.train(self._was_training)
        self.model = None


class VllmEngine(Engine):
    """An HF folder (quantized or not) or a LoRA adapter on its base in vLLM, run by
    ``vllm_worker.py`` in the vLLM environment; top-k log-probs per position come back."""

    name = VLLM
    distribution = "top-k"
    env = "vllm"
    script = Path(__file__).with_name("vllm_worker.py")

    @classmethod
    def job_options(cls, s: Settings) -> dict[str, Any]:
        opts: dict[str, Any] = {"topk": s.topk, "dtype": s.vllm_dtype, "eager": s.vllm_eager}
        if s.tensor_parallel_size > 1 or s.pipeline_parallel_size > 1:
            opts["tensor_parallel_size"] = s.tensor_parallel_size
            opts["pipeline_parallel_size"] = s.pipeline_parallel_size
        return opts

    @staticmethod
    def check_parallel(tp: int, pp: int) -> None:
        """Refuse (InputError, exit 2) a parallel layout this host cannot hold before anything
        starts: vLLM puts one rank on each GPU on a CUDA host, and on a CPU host runs one
        process per rank bound to its own cores (``VLLM_CPU_OMP_THREADS_BIND``)."""
        from quantkit.errors import InputError
        from quantkit.host import gpu_count, has_cuda, usable_cores

        world = tp * pp
        if world <= 1:
            return
        layout = f"--tensor-parallel-size {tp}" + (
            f" × --pipeline-parallel-size {pp}" if pp > 1 else ""
        )
        if has_cuda():
            have, what = gpu_count(), "GPUs"
        else:
            have, what = usable_cores(), "CPU cores this process may use"
        if world > have:
            raise InputError(
                f"{layout} needs {world} vLLM ranks, one per "
                f"{'GPU' if what == 'GPUs' else 'core'}, and this host has {have} {what}",
                f"use a layout of at most {have} ranks (tensor × pipeline), or validate on a "
                f"host with {world} {'GPUs' if what == 'GPUs' else 'cores'}",
            )

    @classmethod
    def finish(cls, job: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
        return finish_topk(job, res)


ENGINES: dict[str, type[Engine]] = {
    e.name: e for e in (LlamaCppEngine, TransformersEngine, VllmEngine)
}


def finish_topk(job: dict[str, Any], res: dict[str, Any]) -> dict[str, Any]:
    """Quality figures from a worker's raw top-k arrays (``vllm_worker.py``) against the cached
    reference, with the metric code every engine shares; and its tokenization check."""
    from quantkit.validate.metrics import Accumulator, position_stats_topk, renormalize
    from quantkit.validate.worker import quality, tokenization

    chunks = np.load(job["chunks"])
    first = int(job["first"])
    sc = res.pop("scores")
    ids = np.load(sc["topk_ids"], mmap_mode="r")
    lps = np.load(sc["topk_logprobs"], mmap_mode="r")
    tgt = np.load(sc["target_logprobs"], mmap_mode="r")
    ref = np.load(job["ref_logprobs"], mmap_mode="r")
    acc = Accumulator()
    dmax = 0.0
    for i in range(chunks.shape[0]):
        lp_ref = renormalize(ref[i]) if ref.dtype == np.float16 else np.asarray(ref[i])
        targets = np.asarray(chunks[i, first + 1 :])
        acc.extend(position_stats_topk(ids[i], lps[i], tgt[i], targets, lp_ref))
        ref_t = lp_ref[np.arange(len(targets)), targets].astype(np.float64)
        dmax = max(dmax, float(np.max(np.abs(np.asarray(tgt[i], np.float64) - ref_t))))
    # max |log q(next) − log p_ref(next)|: an exactness check where only top-k comes back
    # (float16-rounded when the reference cache is float16, see ref_dtype)
    res["quality"] = {**quality(acc, VllmEngine.distribution), "max_abs_dlogprob": dmax}
    tok = res.pop("tokenization", None)
    if tok:
        res["tokenization"] = tokenization(job, np.load(tok["ids"]).tolist(), tok["adds_bos"])
    return res


# Engines a user may ask for by name for Hugging Face folders (``validate --engine``).
HF_ENGINES: tuple[str, ...] = (TransformersEngine.name, VllmEngine.name)


def hf_quant_method(folder: Path) -> str | None:
    """``quantization_config.quant_method`` of an HF folder's config.json (None when plain)."""
    return describe(folder).quant_method


def engine_for(path: str | Path, hf_engine: str | None = None) -> str:
    """The engine that runs an artifact (validate/describe.py ``Described.engine``)."""
    return describe(path).engine(hf_engine)


def hf_audit(folder: Path, n_params: int | None) -> dict[str, Any]:
    """The report's size fields of an HF folder: its type label and, given the model's parameter
    count (the reference's: the same model), bits per weight as for a GGUF (bytes of every
    stored tensor, scales included, × 8 / parameters)."""
    from quantkit.checkpoint import parse_safetensors_header
    from quantkit.errors import QuantkitError

    out: dict[str, Any] = {"file_type": hf_file_type(folder)}
    if n_params and not is_lora_dir(folder):
        try:
            nbytes = sum(
                t.nbytes
                for f in folder.glob("*.safetensors")
                for t in parse_safetensors_header(f)[0].values()
            )
        except (OSError, QuantkitError):
            return out
        if nbytes:
            out.update(n_params=n_params, bits_per_weight=round(nbytes * 8 / n_params, 4))
    return out


def hf_file_type(folder: Path) -> str | None:
    """A short type label for an HF folder, as the report's "type" column shows it
    (validate/describe.py)."""
    return describe(folder).label
