"""The root of shadowctl's own exception tree.

Every adapter defines its errors under :class:`ShadowctlError` and chains the
third-party exception that caused it (``raise X(...) from exc``), so that the
kubernetes, httpx, prometheus-api-client and MQTT libraries' exceptions never
leak out of the adapters::

    ShadowctlError
    ├── PolicyError                  (shadowctl.policy: bad policy input)
    ├── KubeError                    (shadowctl.kube)
    │   ├── NotFound, Conflict, Forbidden, Invalid, Unavailable
    ├── RouterError                  (shadowctl.routers)
    ├── SourceError                  (shadowctl.sources)
    └── ...
"""


class ShadowctlError(Exception):
    """Base class of every error shadowctl raises on purpose."""
