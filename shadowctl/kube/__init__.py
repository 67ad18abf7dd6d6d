"""shadowctl.kube."""
