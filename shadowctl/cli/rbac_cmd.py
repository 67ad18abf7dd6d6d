"""`shadowctl rbac secrets` / `configmaps`: the Roles that let the controller read exactly the Secrets (or
ConfigMaps: prompt versions, judge prompts) policies name.

The controller has no cluster-wide access to Secrets (deploy/rbac.yaml). For each namespace
whose policies name Secrets (a Prometheus token, an MQTT password, TLS material, a webhook
signing key), this prints a Role granting ``get`` on those Secrets by name (``resourceNames``)
and a RoleBinding to the controller's ServiceAccount. ``get`` only: ``list`` cannot be limited
by name, and the controller re-reads a Secret with ``get`` (a short cache, and at once after a
server refused the credentials) instead of watching it. Pipe it to ``kubectl apply -f -``;
run it again when a policy names another Secret. ``shadowctl rbac configmaps`` does the same for the
ConfigMaps policies name (:mod:`shadowctl.policy.configmap_refs`), Role ``shadowctl-configmaps``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from shadowctl.cli.common import fail
from shadowctl.cli.policy_files import load_policies, policy_files
from shadowctl.policy import PolicyError
from shadowctl.policy.configmap_refs import configmaps_by_namespace
from shadowctl.policy.model import ShadowPolicy
from shadowctl.policy.secret_refs import secrets_by_namespace

rbac_app = typer.Typer(name="rbac", help="Print the Roles that let the controller read exactly the Secrets "
                                         "(or ConfigMaps) policies name.", no_args_is_help=True)

ROLE = "shadowctl-secrets"
CONFIGMAP_ROLE = "shadowctl-configmaps"


def secret_roles(by_namespace: dict[str, list[str]], service_account: str, service_account_namespace: str,
                 role: str = ROLE, resource: str = "secrets") -> list[dict[str, Any]]:
    """A Role (``get`` on the named Secrets, or on the named objects of `resource`) and a RoleBinding per
    namespace."""
    docs: list[dict[str, Any]] = []
    for namespace, names in by_namespace.items():
        meta = {"name": role, "namespace": namespace, "labels": {"app.kubernetes.io/name": "shadowctl"}}
        docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
                     "rules": [{"apiGroups": [""], "resources": [resource], "verbs": ["get"],
                                "resourceNames": names}]})
        docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": dict(meta),
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role},
                     "subjects": [{"kind": "ServiceAccount", "name": service_account,
                                   "namespace": service_account_namespace}]})
    return docs


@rbac_app.command("secrets")
def secrets(
    paths: Annotated[list[Path], typer.Argument(
        help="Policy files or directories (searched recursively for *.yaml and *.yml).", show_default=False)],
    service_account: Annotated[str, typer.Option(
        "--service-account", metavar="NAMESPACE/NAME",
        help="The controller's ServiceAccount, bound to each Role.")] = "shadowctl/shadowctl",
    role: Annotated[str, typer.Option("--role", help="Name of the Role and RoleBinding in each namespace.")] = ROLE,
) -> None:
    """Print a Role and RoleBinding per namespace that let the controller `get` exactly the Secrets the
    policies name (resourceNames), nothing else. Example: shadowctl rbac secrets policies/ | kubectl apply -f -"""
    sa_namespace, sa_name = _service_account(service_account)
    by_namespace = secrets_by_namespace(_policies(paths))
    if not by_namespace:
        sys.stderr.write("the policies name no Secret: the controller needs no access to Secrets\n")
        return
    sys.stdout.write(yaml.safe_dump_all(secret_roles(by_namespace, sa_name, sa_namespace, role), sort_keys=False))


@rbac_app.command("configmaps")
def configmaps(
    paths: Annotated[list[Path], typer.Argument(
        help="Policy files or directories (searched recursively for *.yaml and *.yml).", show_default=False)],
    service_account: Annotated[str, typer.Option(
        "--service-account", metavar="NAMESPACE/NAME",
        help="The controller's ServiceAccount, bound to each Role.")] = "shadowctl/shadowctl",
    role: Annotated[str, typer.Option("--role", help="Name of the Role and RoleBinding in each namespace.")]
        = CONFIGMAP_ROLE,
) -> None:
    """Print a Role and RoleBinding per namespace that let the controller `get` exactly the ConfigMaps the
    policies name (prompt versions of rewrite.prompt, llm-judge prompts; resourceNames), nothing else. Give it
    the policies as applied: with kustomize's configMapGenerator, the built ShadowPolicy (the generated names
    carry a hash), in a file of its own. Example: shadowctl rbac configmaps policy.yaml | kubectl apply -f -"""
    sa_namespace, sa_name = _service_account(service_account)
    by_namespace = configmaps_by_namespace(_policies(paths))
    if not by_namespace:
        sys.stderr.write("the policies name no ConfigMap: the controller needs no access to ConfigMaps\n")
        return
    sys.stdout.write(yaml.safe_dump_all(secret_roles(by_namespace, sa_name, sa_namespace, role, "configmaps"),
                                        sort_keys=False))


def _service_account(value: str) -> tuple[str, str]:
    sa_namespace, sep, sa_name = value.partition("/")
    if not sep or not sa_namespace or not sa_name:
        raise fail(f"--service-account {value!r}: expected NAMESPACE/NAME, e.g. shadowctl/shadowctl", 2)
    return sa_namespace, sa_name


def _policies(paths: list[Path]) -> list[ShadowPolicy]:
    """Every policy in the files (each problem printed, exit 1, when one does not load)."""
    policies: list[ShadowPolicy] = []
    for path in policy_files(paths):
        try:
            policies.extend(load_policies(path))
        except PolicyError as exc:
            for problem in exc.problems:
                sys.stderr.write(f"{problem}\n")
            raise typer.Exit(1) from None
    return policies


def register(app: typer.Typer) -> None:
    """Add the `rbac` command group to the root app."""
    app.add_typer(rbac_app, name="rbac")
