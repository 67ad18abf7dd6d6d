#!/usr/bin/env bash
# Set everything up, then run the whole check: ruff, mypy (strict), import-linter, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check shadowctl tests bench
echo "== mypy (strict)"
mypy
echo "== import-linter"
lint-imports
echo "== pytest"
pytest "$@"
