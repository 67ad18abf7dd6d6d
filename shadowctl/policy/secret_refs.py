"""Which Secrets a policy names, for the controller's RBAC (a Role with ``resourceNames``).

The controller reads a Secret only because a policy names it, and only in the policy's own
namespace; ``shadowctl rbac secrets`` turns what this module finds into one Role and one
RoleBinding per namespace, so the controller's identity can ``get`` exactly those Secrets and
no other (no ``list``, no ``watch``: see :mod:`shadowctl.sources.secrets`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from shadowctl.policy.model import ShadowPolicy, TlsSecrets


def _name(ref: str) -> str:
    return ref.partition("/")[0]


def _tls(tls: TlsSecrets | None, where: str) -> Iterator[tuple[str, str]]:
    if tls is not None:
        if tls.ca_secret is not None:
            yield _name(tls.ca_secret), f"{where}.caSecret"
        if tls.cert_secret is not None:
            yield tls.cert_secret, f"{where}.certSecret"


def secret_refs(policy: ShadowPolicy) -> list[tuple[str, str]]:
    """(Secret name, the policy field that names it), in the order of the spec; the namespace is the policy's."""
    out: list[tuple[str, str]] = []
    analysis = policy.spec.analysis
    if analysis.prometheus is not None:
        if analysis.prometheus.bearer_token_secret is not None:
            out.append((_name(analysis.prometheus.bearer_token_secret), "spec.analysis.prometheus.bearerTokenSecret"))
        out.extend(_tls(analysis.prometheus.tls, "spec.analysis.prometheus.tls"))
    if analysis.outputs is not None:
        mqtt = analysis.outputs.mqtt
        if mqtt.password_secret is not None:
            out.append((_name(mqtt.password_secret), "spec.analysis.outputs.mqtt.passwordSecret"))
        out.extend(_tls(mqtt.tls, "spec.analysis.outputs.mqtt.tls"))
        for i, comparator in enumerate(analysis.outputs.comparators):
            if comparator.judge is not None and comparator.judge.api_key_secret is not None:
                out.append((_name(comparator.judge.api_key_secret),
                            f"spec.analysis.outputs.comparators[{i}].judge.apiKeySecret"))
    for i, hook in enumerate(policy.spec.notifications.webhooks):
        if hook.signing_secret is not None:
            out.append((_name(hook.signing_secret), f"spec.notifications.webhooks[{i}].signingSecret"))
    return out


def secrets_by_namespace(policies: Iterable[ShadowPolicy]) -> dict[str, list[str]]:
    """Namespace -> the sorted names of the Secrets its policies name (namespaces sorted; none: absent)."""
    found: dict[str, set[str]] = {}
    for policy in policies:
        names = {name for name, _ in secret_refs(policy)}
        if names:
            found.setdefault(policy.metadata.namespace, set()).update(names)
    return {ns: sorted(found[ns]) for ns in sorted(found)}
