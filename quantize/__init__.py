"""Quantization (``quantkit.quantize``): GGUF types through llama.cpp's own quantizer."""
