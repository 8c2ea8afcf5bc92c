#!/usr/bin/env bash
# Run quantkit's test suite: installs what is missing first (idempotent), then pytest.
# Extra arguments go to pytest, e.g. scripts/test.sh -k tokenizer
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$repo/scripts/install.sh"
cd "$repo"
exec "${QUANTKIT_VENV:-$repo/.venv}/bin/python" -m pytest -q "$@"
