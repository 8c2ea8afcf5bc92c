"""``gptq:auto``: a mixed-precision compressed-tensors checkpoint for vLLM at a bit budget.

spec.py (target grammar) → groups.py (fused layer groups) → host.py (candidates this host's
vLLM runs) → sensitivity.py (predicted error per group and scheme) → plan.py (knapsack, the
llm-compressor config groups, bits accounting) → select.py (candidate plans and the uniform
schemes at the budget exported and measured in vLLM on held-out calibration chunks; the best
ships). schemes.py is the candidate table.
"""
