"""`shadowctl sim ...`: the local environment's parts, one at a time (`sim cluster`: a real control plane)."""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer

from shadowctl.cli.common import fail
from shadowctl.errors import ShadowctlError

sim_app = typer.Typer(
    name="sim",
    help="Parts of the local environment that tests and the demo use, started one at a time.",
    no_args_is_help=True,
    add_completion=False,
)


@sim_app.command("cluster")
def cluster(
    kubeconfig: Annotated[Path, typer.Option("--kubeconfig", help="Write the admin kubeconfig here.")],
    crds: Annotated[Path | None, typer.Option(
        "--crds", help="Folder of upstream CRDs (default: .venv/share/shadowctl/crds, from hack/setup.sh).")] = None,
    knative: Annotated[bool, typer.Option(
        "--knative/--no-knative", help="Run the Knative stand-in (webhook and controller).")] = True,
    kserve: Annotated[bool, typer.Option(
        "--kserve/--no-kserve",
        help="Install KServe's InferenceService CRD (from --crds, else the checkout's ../shared/crds) and run the "
             "KServe stand-in (a controller that writes InferenceService status). Skipped, with a note, when the "
             "CRD is in neither folder.")] = True,
) -> None:
    """Run a real Kubernetes control plane on this machine until Ctrl-C (or SIGTERM).

    Starts etcd and kube-apiserver (the binaries hack/setup.sh builds) on free loopback ports, envtest's way: no kubelet, no controllers, RBAC on, its own CA and certificates.

    Installs shadowctl's CRD and the upstream Istio, Knative and Gateway API CRDs (and KServe's, see --kserve), runs the Knative stand-in (an admission webhook, and a controller that writes Service and Revision status) and the KServe stand-in, writes an admin kubeconfig to --kubeconfig and prints a line starting with `ready`. On exit it stops both processes and removes their data.

    Example: shadowctl sim cluster --kubeconfig /tmp/kc &  then  KUBECONFIG=/tmp/kc .venv/bin/kubectl apply -k deploy/
    """
    from shadowctl.sim.cluster import LocalCluster

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        local = LocalCluster(crds=crds, knative=knative)
        local.start()
    except ShadowctlError as exc:
        raise fail(str(exc)) from None
    if kserve:
        try:
            local.enable_kserve()
        except ShadowctlError as exc:
            print(f"sim cluster: no KServe: {exc}", file=sys.stderr, flush=True)
    try:
        local.plane.write_kubeconfig(kubeconfig)
        print(f"ready {local.url} ({local.plane.versions}); kubeconfig: {kubeconfig}", flush=True)
        while not stop.wait(1.0):
            ended = local.plane.alive()
            if ended:
                print(f"sim cluster: {ended}", file=sys.stderr, flush=True)
                raise typer.Exit(1)
    finally:
        local.stop()
        kubeconfig.unlink(missing_ok=True)


def register(app: typer.Typer) -> None:
    app.add_typer(sim_app)
