"""Prompt log-probs of LoRA adapters served by vLLM (runs in the vLLM env, not quantkit's).

Usage: python vllm_lora_check.py JOB.json — JOB has base, adapters {name: dir}, tokens,
max_lora_rank, threads, out; writes {name: [logprob of tokens[j] given tokens[:j], j >= 1]}.
"""

from __future__ import annotations

import json
import os
import sys


def main() -> None:
    job = json.loads(open(sys.argv[1]).read())
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    cpus = sorted(os.sched_getaffinity(0))[: int(job.get("threads", 2))]
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, cpus)))
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    from vllm.lora.request import LoRARequest

    toks = job["tokens"]
    llm = LLM(
        model=job["base"],
        tokenizer=job["base"],
        dtype="float32",
        enable_lora=True,
        max_lora_rank=int(job["max_lora_rank"]),
        max_loras=1,
        max_model_len=len(toks) + 1,
        max_num_batched_tokens=len(toks) + 1,
        max_num_seqs=1,
        enable_prefix_caching=False,
        seed=0,
    )
    sp = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False, temperature=0.0)
    out = {}
    for i, (name, path) in enumerate(job["adapters"].items()):
        r = llm.generate(
            [TokensPrompt(prompt_token_ids=toks)],
            sp,
            lora_request=LoRARequest(name, i + 1, path),
            use_tqdm=False,
        )[0]
        out[name] = [r.prompt_logprobs[j][toks[j]].logprob for j in range(1, len(toks))]
    with open(job["out"], "w") as f:
        json.dump(out, f)


if __name__ == "__main__":  # vLLM spawns workers: the guard is required (DESIGN.md)
    main()
