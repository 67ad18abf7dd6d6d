#!/usr/bin/env bash
# Set everything up, then run the whole check: ruff, mypy (strict), import-linter, pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
echo "== ruff"
ruff check shadowctl tests bench deploy/grafana
echo "== mypy (strict)"
mypy
mypy --strict deploy/grafana/build.py  # a script beside the dashboard it writes, outside the package
echo "== import-linter"
lint-imports
echo "== pytest"
pytest "$@"
