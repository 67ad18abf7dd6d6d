"""The ShadowPolicy model, its YAML parser, the status model and the generated CRD (pure core: files are read by the CLI, cli/policy_files.py).

The names below load on first use: building the policy model's validators takes a good part of a
light command's start, and a reader of `.status` (``shadowctl get``) needs ``policy.status`` only.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from shadowctl.policy.loader import PolicyError, Problem, parse_policies
    from shadowctl.policy.model import API_VERSION, GROUP, KIND, PLURAL, VERSION, ShadowPolicy

_HOME = dict.fromkeys(("PolicyError", "Problem", "parse_policies"), "loader")
"""Where each name lives; the rest are in :mod:`.model`."""


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module 'shadowctl.policy' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"shadowctl.policy.{_HOME.get(name, 'model')}"), name)
    globals()[name] = value
    return value


__all__ = [
    "API_VERSION",
    "GROUP",
    "KIND",
    "PLURAL",
    "VERSION",
    "PolicyError",
    "Problem",
    "ShadowPolicy",
    "parse_policies",
]
