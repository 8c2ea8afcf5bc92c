#!/usr/bin/env bash
# Install quantkit and its engines into a virtual env (default: .venv beside this repo).
#
#   scripts/install.sh            # venv + torch (CPU) + llama-cpp-python built for this CPU + quantkit
#                                 # + the vLLM and llm-compressor envs (`quantkit engines setup all`)
#
# Idempotent: a second run only checks. Environment:
#   QUANTKIT_VENV      where the venv goes (default: <repo>/.venv)
#   QUANTKIT_CACHE     wheel/sdist cache (default: ${XDG_CACHE_HOME:-~/.cache}/quantkit)
#   PYTHON             interpreter to build the venv from (default: python3.11, else python3)
#   QUANTKIT_SKIP_ENGINES=1  do not create the vLLM / llm-compressor environments
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${QUANTKIT_VENV:-$repo/.venv}"
cache="${QUANTKIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/quantkit}"
llama_version="0.3.36"   # pinned: the version docs/decisions.md's measurements were made with
torch_version="2.13.0"   # the CPU wheel provided locally; a bare `torch` would pull CUDA builds

say() { printf '[install] %s\n' "$*" >&2; }

py="${PYTHON:-}"
if [ -z "$py" ]; then
  if command -v python3.11 >/dev/null 2>&1; then py=python3.11; else py=python3; fi
fi
"$py" - <<'PY' || { say "Python >= 3.10 is required (found $("$py" --version 2>&1))"; exit 2; }
import sys; sys.exit(0 if sys.version_info >= (3, 10) else 1)
PY

if [ ! -x "$venv/bin/python" ]; then
  say "creating virtual env at $venv"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
fi
vpy="$venv/bin/python"
pip=("$vpy" -m pip install -q)

# 1. torch first, pinned, so nothing later resolves `torch` to a multi-GB CUDA build.
if ! "$vpy" -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('$torch_version') else 1)" 2>/dev/null; then
  say "installing torch==$torch_version (CPU)"
  "${pip[@]}" "torch==$torch_version"
fi

# 2. llama-cpp-python from source with CMake flags derived from this CPU (quantkit/buildflags.py).
#    pip's wheel cache ignores CMAKE_ARGS, so wheels are kept in our own cache keyed by the flags.
cmake_args="$("$vpy" "$repo/quantkit/buildflags.py" args)"
key="$("$vpy" "$repo/quantkit/buildflags.py" key)"
marker="$venv/.llama-cpp-flags"
if [ "$(cat "$marker" 2>/dev/null)" != "$llama_version-$key" ] || ! "$vpy" -c "import llama_cpp" 2>/dev/null; then
  sdist_dir="$cache/sdist"
  wheel_dir="$cache/wheels/llama-cpp-python-$llama_version-$key"
  mkdir -p "$sdist_dir" "$wheel_dir"
  sdist="$sdist_dir/llama_cpp_python-$llama_version.tar.gz"
  if [ ! -f "$sdist" ]; then
    say "downloading llama-cpp-python $llama_version source"
    "$vpy" -m pip download -q --no-deps --no-binary llama-cpp-python -d "$sdist_dir" "llama-cpp-python==$llama_version"
  fi
  if ! ls "$wheel_dir"/llama_cpp_python-*.whl >/dev/null 2>&1; then
    say "building llama-cpp-python $llama_version for this CPU (6-8 minutes on 2 cores)"
    say "CMAKE_ARGS=$cmake_args"
    tmp="$(mktemp -d "$wheel_dir.tmp.XXXX")"
    trap 'rm -rf "$tmp"' EXIT  # an interrupted build leaves no half-made wheel dir
    CMAKE_ARGS="$cmake_args" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      "$vpy" -m pip wheel -q --no-deps --no-cache-dir -w "$tmp" "$sdist"
    mv "$tmp"/llama_cpp_python-*.whl "$wheel_dir"/ && rm -rf "$tmp"
  fi
  "${pip[@]}" --no-deps --force-reinstall "$wheel_dir"/llama_cpp_python-*.whl
  # llama-cpp-python's own runtime deps (it was installed with --no-deps above)
  "${pip[@]}" "typing-extensions>=4.5" "numpy>=1.20" "diskcache>=5.6.1" "jinja2>=2.11.3"
  echo "$llama_version-$key" > "$marker"
fi

# 3. quantkit itself (editable) with test tools; redone only when pyproject.toml changes.
stamp="$venv/.quantkit-pyproject"
want="$(sha256sum "$repo/pyproject.toml" | cut -c1-16)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ] || [ ! -x "$venv/bin/quantkit" ]; then
  say "installing quantkit"
  "${pip[@]}" -e "$repo[dev]"
  echo "$want" > "$stamp"
fi

# 4. the engine environments (vLLM, llm-compressor), each its own venv in the shared cache
#    (quantkit/envs.py); a second run only checks. QUANTKIT_SKIP_ENGINES=1 skips them.
if [ "${QUANTKIT_SKIP_ENGINES:-0}" != "1" ]; then
  QUANTKIT_CACHE="$cache" "$venv/bin/quantkit" engines setup all
fi
say "ready: $venv/bin/quantkit"
