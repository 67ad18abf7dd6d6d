#!/usr/bin/env bash
# Set everything up, then run the main job: a whole rollout on this machine (shadowctl demo).
# Extra arguments go to `shadowctl demo` (e.g. --scenario bad-latency).
set -euo pipefail
cd "$(dirname "$0")/.."
hack/setup.sh
.venv/bin/shadowctl validate policies/ --quiet
exec .venv/bin/shadowctl demo --scenario good "$@"
