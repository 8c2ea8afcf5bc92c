"""HF checkpoint → quantized GGUF through llama.cpp, and everything quantkit knows about GGUF files.

types.py      the GGUF file types, one table
ggml.py       ggml tensor types as the installed libggml names and sizes them
libllama.py   libllama through llama-cpp-python (log capture, signals, vocab-only loads)
quantizer.py  llama_model_quantize: one type, per-tensor overrides, fallbacks from its log
imatrix.py    the importance matrix (torch collection, llama.cpp's imatrix GGUF)
audit.py      what a quantized file holds: types, bits per weight, fallbacks
reader.py     a bounded GGUF header and tensor-table reader (inspect, audits, validation)
auto/         gguf:auto: per-tensor types fitted to a size or bits-per-weight budget
"""
