"""shadowctl: shadow-traffic and canary controller for GPU-served models on Kubernetes."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("shadowctl")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
