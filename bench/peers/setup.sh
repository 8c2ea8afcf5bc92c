#!/usr/bin/env bash
# Create the virtual envs of the peer quantizers that bench/peers/run.py compares with gguf:auto.
#
#   bench/peers/setup.sh [autoround|prismaquant|all]      (default: all)
#
# Each peer gets its own env: their pins (transformers, torch, numpy) differ from quantkit's and
# from each other's. torch is installed first and pinned to the CPU build, or a bare `torch`
# requirement pulls the multi-GB CUDA one. Idempotent: an env whose marker matches is left alone.
#   QUANTKIT_PEER_ENVS   where the envs go (default: ${XDG_CACHE_HOME:-~/.cache}/quantkit/envs)
#   PYTHON               interpreter to build them from (default: python3.11, else python3)
set -euo pipefail

envs="${QUANTKIT_PEER_ENVS:-${XDG_CACHE_HOME:-$HOME/.cache}/quantkit/envs}"
torch_version="2.13.0"
autoround_version="0.16.1"    # PyPI auto-round: AutoScheme (avg_bits) and GGUF export
prismaquant_version="0.16.2"  # PyPI prismaquant: its GGUF lane
gguf_version="0.19.0"         # auto-round imports it for its GGUF export but does not require it
sentencepiece_version="0.2.3" # so does its GGUF vocabulary writer (a Llama tokenizer)

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
say() { printf '[peers] %s\n' "$*" >&2; }

make_env() {  # NAME PACKAGE==VERSION [more requirements]
  local name="$1"; shift
  local dir="$envs/peer-$name" want="$*"
  if [ "$(cat "$dir/.peer-spec" 2>/dev/null)" = "$torch_version $want" ]; then
    say "$name: $dir is ready"; return 0
  fi
  say "$name: creating $dir"
  rm -rf "$dir"
  "$py" -m venv "$dir"
  "$dir/bin/python" -m pip install -q --upgrade pip
  "$dir/bin/python" -m pip install -q "torch==$torch_version"
  # keep torch where it is: a peer's requirement must not swap it for a CUDA build
  "$dir/bin/python" -m pip install -q "$@" "torch==$torch_version"
  echo "$torch_version $want" > "$dir/.peer-spec"
  "$dir/bin/python" -m pip freeze > "$dir/freeze.txt"
  say "$name: ready ($(wc -l < "$dir/freeze.txt") packages, list in $dir/freeze.txt)"
}

what="${1:-all}"
case "$what" in
  autoround|all) make_env autoround "auto-round==$autoround_version" "gguf==$gguf_version" \
    "sentencepiece==$sentencepiece_version" ;;&
  prismaquant|all) make_env prismaquant "prismaquant==$prismaquant_version" ;;
  autoround) ;;
  *) say "unknown peer: $what (autoround, prismaquant, all)"; exit 2 ;;
esac
