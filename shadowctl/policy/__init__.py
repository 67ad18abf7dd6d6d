"""The ShadowPolicy model, its YAML loader and the generated CRD (pure core)."""

from shadowctl.policy.loader import PolicyError, Problem, load_policies, load_policy, parse_policies, policy_files
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
    "load_policies",
    "load_policy",
    "parse_policies",
    "policy_files",
]
