"""Fit a GGUF to a budget: per-tensor sensitivity measured once, then the best mix of llama.cpp
tensor types for a given file size or bits per weight (``gguf:auto``), written by llama.cpp's
own quantizer with per-tensor types."""
