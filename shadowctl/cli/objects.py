"""ShadowPolicy objects as the API server returns them (plain JSON): reading them, and their common fields.

The readers are lenient (a missing or malformed field reads as empty): these objects come from a
cluster, where another tool, an older controller or a person with kubectl may have written them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shadowctl.cli.connect import CliError

if TYPE_CHECKING:
    from shadowctl.kube import KubeReader
    from shadowctl.policy.status import PolicyStatus

JSON = dict[str, Any]

KIND_LABEL = "shadowpolicy"
#: How often a write that met a 409 is re-read and recomputed.
CONFLICT_ATTEMPTS = 5


def dict_of(value: Any) -> JSON:
    """``value`` when it is a mapping, else an empty one."""
    return value if isinstance(value, dict) else {}


def meta_of(obj: JSON) -> JSON:
    return dict_of(obj.get("metadata"))


def status_of(obj: JSON) -> PolicyStatus:
    """The typed ``.status`` (the one way the CLI reads it; lenient, see :mod:`shadowctl.policy.status`)."""
    from shadowctl.policy.status import PolicyStatus

    return PolicyStatus.of(obj)


def key_of(obj: JSON) -> str:
    """`namespace/name`."""
    meta = meta_of(obj)
    return f"{meta.get('namespace') or 'default'}/{meta.get('name')}"


def phase_of(obj: JSON) -> str:
    """``.status.phase``, ``Pending`` before the controller wrote one."""
    return status_of(obj).phase.value


async def read_policy(client: KubeReader, namespace: str, name: str) -> JSON:
    """GET one ShadowPolicy; a missing one is a CliError naming it."""
    from shadowctl.kube import SHADOW_POLICY, NotFound, ResourceRef

    try:
        return await client.get(ResourceRef(SHADOW_POLICY, name, namespace))
    except NotFound as exc:
        raise CliError(f"{KIND_LABEL} {namespace}/{name} not found") from exc


async def list_policies(client: KubeReader, namespace: str | None) -> list[JSON]:
    """List ShadowPolicies (``namespace=None``: all), by namespace and name; a missing CRD is explained."""
    from shadowctl.kube import SHADOW_POLICY, NotFound

    try:
        items = (await client.list(SHADOW_POLICY, namespace)).items
    except NotFound as exc:
        raise CliError("the ShadowPolicy resource is not served by this cluster: install the CRD "
                       "(kubectl apply -f deploy/crd.yaml)") from exc
    return sorted(items, key=lambda o: (meta_of(o).get("namespace") or "", meta_of(o).get("name") or ""))
