// Pins the upstream CRDs the local control plane installs (hack/setup.sh copies them out of the module cache).
module shadowctl.dev/hack/crds

go 1.26.0

require (
	istio.io/api v1.32.0
	knative.dev/serving v0.51.0
	sigs.k8s.io/gateway-api v1.6.1
)
