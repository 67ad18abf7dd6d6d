"""shadowctl: shadow-traffic and canary controller for GPU-served models on Kubernetes."""

from __future__ import annotations

__all__ = ["__version__"]


def __getattr__(name: str) -> str:
    # Read on first use: importlib.metadata costs every command 30 ms at start, and only --version needs it.
    if name != "__version__":
        raise AttributeError(f"module 'shadowctl' has no attribute {name!r}")
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("shadowctl")
    except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
        return "0.0.0+unknown"
