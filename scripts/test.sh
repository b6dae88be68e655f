#!/usr/bin/env bash
# Set up (once) and run the whole test suite. Fails when no test ran (pytest exits 5).
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup.sh"
ruff check .
exec python -m pytest -q "$@"
