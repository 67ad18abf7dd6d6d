"""Which ConfigMaps a policy names, for the controller's RBAC (a Role with ``resourceNames``), as
:mod:`shadowctl.policy.secret_refs` does for Secrets.

The controller reads a ConfigMap only because a policy names it (a prompt version of a tap target's
``rewrite.prompt``, the llm-judge comparator's prompt template), in the policy's own namespace, with ``get``;
``shadowctl rbac configmaps`` turns what this module finds into a Role and RoleBinding per namespace.
"""

from __future__ import annotations

from collections.abc import Iterable

from shadowctl.policy.model import ShadowPolicy


def configmap_refs(policy: ShadowPolicy) -> list[tuple[str, str]]:
    """(ConfigMap name, the policy field that names it), in the order of the spec."""
    out: list[tuple[str, str]] = []
    tap = policy.spec.target.tap
    if tap is not None and tap.rewrite is not None and tap.rewrite.prompt is not None:
        prompt = tap.rewrite.prompt
        for which, source in (("primary", prompt.primary), ("candidate", prompt.candidate)):
            out.append((source.config_map_ref.name, f"spec.target.tap.rewrite.prompt.{which}.configMapRef"))
    outputs = policy.spec.analysis.outputs
    if outputs is not None:
        for i, comparator in enumerate(outputs.comparators):
            judge = comparator.judge
            if judge is not None and judge.prompt.config_map_ref is not None:
                out.append((judge.prompt.config_map_ref.name,
                            f"spec.analysis.outputs.comparators[{i}].judge.prompt.configMapRef"))
    return out


def configmaps_by_namespace(policies: Iterable[ShadowPolicy]) -> dict[str, list[str]]:
    """Namespace -> the sorted names of the ConfigMaps its policies name (namespaces sorted; none: absent)."""
    found: dict[str, set[str]] = {}
    for policy in policies:
        names = {name for name, _ in configmap_refs(policy)}
        if names:
            found.setdefault(policy.metadata.namespace, set()).update(names)
    return {ns: sorted(found[ns]) for ns in sorted(found)}
