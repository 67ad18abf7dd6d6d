"""The ShadowPolicy model, its YAML parser, the status model and the generated CRD (pure core: files are read by the CLI, cli/policy_files.py).

The names below load on first use: building the policy model's validators takes a good part of a
light command's start, and a reader of `.status` (``shadowctl get``) needs ``policy.status`` only.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from shadowctl.lazy import lazy_exports

if TYPE_CHECKING:
    from shadowctl.policy.loader import PolicyError, Problem, parse_policies
    from shadowctl.policy.model import API_VERSION, GROUP, KIND, PLURAL, VERSION, ShadowPolicy

_HOME = dict.fromkeys(("PolicyError", "Problem", "parse_policies"), "loader")
"""Where each name lives; the rest are in :mod:`.model`."""


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

__getattr__ = lazy_exports(__name__, __all__, _HOME, "model")
