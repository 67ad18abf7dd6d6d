#!/usr/bin/env bash
# Build the local control plane's binaries (etcd, kube-apiserver, kubectl) into .venv/bin from the
# Go modules pinned in hack/etcd, hack/kube and hack/crds, and copy the pinned upstream CRDs to
# .venv/share/shadowctl/crds. Called by hack/setup.sh; reuses the build while the pins are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=.venv/bin
crds=.venv/share/shadowctl/crds
pins=$(cat hack/etcd/go.mod hack/etcd/go.sum hack/etcd/main.go hack/kube/go.mod hack/kube/go.sum \
           hack/crds/go.mod hack/crds/go.sum hack/kube-build.sh | sha256sum | cut -c1-16)
stamp=.venv/.shadowctl-kube-$pins
if [ -f "$stamp" ] && [ -x "$bin/etcd" ] && [ -x "$bin/kube-apiserver" ] && [ -x "$bin/kubectl" ] \
   && [ -d "$crds" ]; then
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  for candidate in /usr/local/go/bin/go /usr/lib/go/bin/go; do
    [ -x "$candidate" ] && export PATH="$(dirname "$candidate"):$PATH" && break
  done
fi
if ! command -v go >/dev/null 2>&1; then
  echo "setup: error: Go is not installed. The local Kubernetes control plane (etcd, kube-apiserver," >&2
  echo "setup: kubectl) is built from Go modules: install Go 1.26 or newer (https://go.dev/dl/)" >&2
  echo "setup: and make sure the Go module proxy (GOPROXY, default proxy.golang.org) is reachable." >&2
  exit 1
fi
need="1.26"
have=$(go env GOVERSION | sed 's/^go//')
if [ "$(printf '%s\n%s\n' "$need" "$have" | sort -V | head -1)" != "$need" ]; then
  echo "setup: error: Go $have is too old; kube-apiserver $need needs Go >= $need" >&2
  exit 1
fi

kube_version=$(cd hack/kube && go list -m -f '{{.Version}}' k8s.io/kubernetes)
minor=$(echo "$kube_version" | cut -d. -f2)
ldflags="-s -w"
for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
  ldflags="$ldflags -X $pkg.gitVersion=$kube_version -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ldflags="$ldflags -X $pkg.gitTreeState=clean"
done
export GOFLAGS="-mod=readonly -trimpath"
mkdir -p "$bin"
start=$(date +%s)
echo "setup: building etcd, kube-apiserver $kube_version and kubectl from their Go modules into $bin"
echo "setup: (the first build downloads about 230 MB of modules and takes about 8 minutes on 2 cores)"
if ! (cd hack/etcd && go build -ldflags "-s -w" -o "../../$bin/etcd" .); then
  echo "setup: error: building etcd failed (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))" >&2
  exit 1
fi
for cmd in kube-apiserver kubectl; do
  echo "setup:   $cmd ($(( $(date +%s) - start )) s so far)"
  if ! (cd hack/kube && go build -ldflags "$ldflags" -o "../../$bin/$cmd" "k8s.io/kubernetes/cmd/$cmd"); then
    echo "setup: error: building $cmd failed (is the Go module proxy reachable? GOPROXY=$(go env GOPROXY))" >&2
    exit 1
  fi
done

echo "setup: copying the pinned upstream CRDs (Istio, Knative, Gateway API) to $crds"
dir_of() { (cd hack/crds && go mod download -json "$1" | sed -n 's/^\s*"Dir": "\(.*\)",$/\1/p'); }
istio=$(dir_of istio.io/api)
knative=$(dir_of knative.dev/serving)
gateway=$(dir_of sigs.k8s.io/gateway-api)
rm -rf "$crds" && mkdir -p "$crds"
cp "$istio/kubernetes/customresourcedefinitions.gen.yaml" "$crds/istio.yaml"
for kind in service configuration revision route; do
  cp "$knative/config/core/300-resources/$kind.yaml" "$crds/knative-$kind.yaml"
done
for kind in httproutes gateways gatewayclasses referencegrants; do
  cp "$gateway/config/crd/standard/gateway.networking.k8s.io_$kind.yaml" "$crds/gateway-api-$kind.yaml"
done
chmod -R u+w "$crds"
rm -f .venv/.shadowctl-kube-*
touch "$stamp"
echo "setup: control plane built in $(( $(date +%s) - start )) s: $("$bin/kube-apiserver" --version), etcd $("$bin/etcd" --version | head -1 | awk '{print $3}')"
