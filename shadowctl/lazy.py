"""Package exports loaded on first use (PEP 562), for packages whose modules are costly to import."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def lazy_exports(package: str, names: Sequence[str], home: Mapping[str, str], default: str) -> Callable[[str], Any]:
    """A module ``__getattr__`` that imports ``package.<home of name>`` (``default`` for names not in
    ``home``) the first time one of ``names`` is asked for, and keeps the value in the package."""
    namespace = importlib.import_module(package).__dict__

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{home.get(name, default)}"), name)
        namespace[name] = value
        return value

    return __getattr__
