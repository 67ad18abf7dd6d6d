"""`shadowctl rbac secrets`: the Roles that let the controller read exactly the Secrets policies name.

The controller has no cluster-wide access to Secrets (deploy/rbac.yaml). For each namespace
whose policies name Secrets (a Prometheus token, an MQTT password, TLS material, a webhook
signing key), this prints a Role granting ``get`` on those Secrets by name (``resourceNames``)
and a RoleBinding to the controller's ServiceAccount. ``get`` only: ``list`` cannot be limited
by name, and the controller re-reads a Secret with ``get`` (a short cache, and at once after a
server refused the credentials) instead of watching it. Pipe it to ``kubectl apply -f -``;
run it again when a policy names another Secret.
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
from shadowctl.policy.secret_refs import secrets_by_namespace

rbac_app = typer.Typer(name="rbac", help="Print the Roles that let the controller read exactly the Secrets policies name.",
                       no_args_is_help=True)

ROLE = "shadowctl-secrets"


def secret_roles(by_namespace: dict[str, list[str]], service_account: str, service_account_namespace: str,
                 role: str = ROLE) -> list[dict[str, Any]]:
    """A Role (``get`` on the named Secrets) and a RoleBinding per namespace."""
    docs: list[dict[str, Any]] = []
    for namespace, names in by_namespace.items():
        meta = {"name": role, "namespace": namespace, "labels": {"app.kubernetes.io/name": "shadowctl"}}
        docs.append({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta,
                     "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"],
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
    sa_namespace, sep, sa_name = service_account.partition("/")
    if not sep or not sa_namespace or not sa_name:
        raise fail(f"--service-account {service_account!r}: expected NAMESPACE/NAME, e.g. shadowctl/shadowctl", 2)
    policies = []
    for path in policy_files(paths):
        try:
            policies.extend(load_policies(path))
        except PolicyError as exc:
            for problem in exc.problems:
                sys.stderr.write(f"{problem}\n")
            raise typer.Exit(1) from None
    by_namespace = secrets_by_namespace(policies)
    if not by_namespace:
        sys.stderr.write("the policies name no Secret: the controller needs no access to Secrets\n")
        return
    sys.stdout.write(yaml.safe_dump_all(secret_roles(by_namespace, sa_name, sa_namespace, role), sort_keys=False))


def register(app: typer.Typer) -> None:
    """Add the `rbac` command group to the root app."""
    app.add_typer(rbac_app, name="rbac")
