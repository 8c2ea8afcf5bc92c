#!/usr/bin/env bash
# Build llama.cpp's own command-line tools (llama-imatrix, llama-quantize, llama-perplexity) from
# the same llama-cpp-python sdist and CPU flags as the engine quantkit uses, so that bench/quality.py
# can compare against them. Not part of the install: only the benches need these binaries.
#
#   bench/build_llamacpp_tools.sh            # prints the bin/ directory on stdout
#
# Takes ~5 minutes on 2 cores; reuses the build when it exists.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
vpy="${QUANTKIT_VENV:-$repo/.venv}/bin/python"
cache="${QUANTKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantkit}"
version="0.3.36"  # the llama-cpp-python version scripts/install.sh pins
key="$("$vpy" "$repo/quantkit/buildflags.py" key)"
dest="$cache/tools/llama.cpp-$version-$key"
sdist="$cache/sdist/llama_cpp_python-$version.tar.gz"
[ -f "$sdist" ] || { echo "no $sdist: run scripts/install.sh first" >&2; exit 2; }
if [ ! -x "$dest/build/bin/llama-imatrix" ] || [ ! -x "$dest/build/bin/llama-quantize" ] \
   || [ ! -x "$dest/build/bin/llama-perplexity" ]; then
  mkdir -p "$dest"
  [ -d "$dest/src" ] || { tar -xzf "$sdist" -C "$dest" && mv "$dest/llama_cpp_python-$version/vendor/llama.cpp" "$dest/src" && rm -rf "$dest/llama_cpp_python-$version"; }
  # shellcheck disable=SC2046  # the flags are one word each
  cmake -S "$dest/src" -B "$dest/build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF \
    $("$vpy" "$repo/quantkit/buildflags.py" args) >&2
  cmake --build "$dest/build" -j "$(nproc)" --target llama-imatrix llama-quantize llama-perplexity >&2
fi
echo "$dest/build/bin"
