"""KServe in the tests: the ``kserve`` fixture installs KServe's InferenceService CRD into the session's control
plane and starts the KServe stand-in (shadowctl/sim/kserve.py), once per session.

Why on request and not with the session's control plane: the CRD's 2 MB schema adds 5 to 25 s to the API
server's start on two cores, which sessions without a KServe test should not pay. The CRD comes from the
checkout's ``../shared/crds`` (KServe is not on the Go module proxy, so hack/setup.sh cannot copy it); the
tests that need it skip with that reason where it is absent.
"""

from __future__ import annotations

import pytest

from shadowctl.sim.cluster import LocalCluster


@pytest.fixture
def kserve(local_cluster: LocalCluster) -> None:
    if local_cluster.plane.kserve_crd_file() is None:
        pytest.skip("needs KServe's CRD (../shared/crds/kserve-inferenceservices.yaml)")
    local_cluster.enable_kserve()
