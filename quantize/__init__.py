"""Quantization (``quantkit.quantize``), one package per builder family: ``gguf`` (llama.cpp's
quantizer) and ``vllm`` (llm-compressor)."""
