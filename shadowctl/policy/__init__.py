"""The ShadowPolicy model, its YAML parser and the generated CRD (pure core: files are read by the CLI, cli/policy_files.py)."""

from shadowctl.policy.loader import PolicyError, Problem, parse_policies
from shadowctl.policy.model import API_VERSION, GROUP, KIND, PLURAL, VERSION, ShadowPolicy

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
