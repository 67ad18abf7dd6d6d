"""Traffic routers: the only code that changes where users' live traffic goes (see docs/routers.md)."""

from shadowctl.routers.base import (
    MANAGED_ANNOTATION,
    ApplyResult,
    Capabilities,
    ClusterError,
    ConflictRetriesExhausted,
    DestinationNotFound,
    RevisionsChanged,
    RouteNotFound,
    Router,
    RouterError,
    RouteState,
    UnmanagedTraffic,
    Unsupported,
    VerifyFailed,
    WouldBeRejected,
)

__all__ = [
    "MANAGED_ANNOTATION",
    "ApplyResult",
    "Capabilities",
    "ClusterError",
    "ConflictRetriesExhausted",
    "DestinationNotFound",
    "RevisionsChanged",
    "RouteNotFound",
    "RouteState",
    "Router",
    "RouterError",
    "UnmanagedTraffic",
    "Unsupported",
    "VerifyFailed",
    "WouldBeRejected",
]
