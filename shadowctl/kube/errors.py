"""The kube adapter's error tree.

Every error carries what the API server said (HTTP status, the ``Status``
object's ``reason`` and ``message``, and its ``details.causes`` for 422) so
that callers and logs can show the server's own words. The kubernetes client's
exception, where there is one, is chained as ``__cause__``.
"""

from __future__ import annotations

from typing import Any

from shadowctl.errors import ShadowctlError


class KubeError(ShadowctlError):
    """A Kubernetes API call failed; ``status`` is the HTTP status (None when no response came)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        reason: str = "",
        causes: list[dict[str, Any]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.reason = reason
        self.causes: list[dict[str, Any]] = list(causes or [])
        self.retry_after = retry_after


class ConfigError(KubeError):
    """No usable kubeconfig / in-cluster configuration."""


class BadRequest(KubeError):
    """400: the server could not understand the request."""


class Unauthorized(KubeError):
    """401: no or bad credentials."""


class Forbidden(KubeError):
    """403: RBAC denies the verb on the resource."""


class NotFound(KubeError):
    """404: the object (or the resource type) does not exist."""


class Conflict(KubeError):
    """409: a stale resourceVersion; re-read, recompute, and try again (never overwrite)."""


class AlreadyExists(Conflict):
    """409 with reason AlreadyExists: create of a name that is taken."""


class Gone(KubeError):
    """410 outside a watch."""


class WatchExpired(Gone):
    """410 on a watch: the resourceVersion is too old; re-list and watch from the list's version."""


class UnsupportedMediaType(KubeError):
    """415: e.g. a strategic merge patch sent to a custom resource."""


class Invalid(KubeError):
    """422: the object fails validation; ``causes`` lists ``{field, reason, message}`` entries."""


class Unavailable(KubeError):
    """The server could not be reached or kept failing (timeouts, connection errors, 429, 5xx)."""


_BY_STATUS: dict[int, type[KubeError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    410: Gone,
    415: UnsupportedMediaType,
    422: Invalid,
    429: Unavailable,
}


def error_class(status: int, reason: str = "") -> type[KubeError]:
    """The error class for an HTTP status and a ``Status.reason``."""
    if status == 409 and reason == "AlreadyExists":
        return AlreadyExists
    if status >= 500:
        return Unavailable
    return _BY_STATUS.get(status, KubeError)


def from_status(status: int, body: Any, *, retry_after: float | None = None) -> KubeError:
    """Build the error for an HTTP status and a decoded ``Status`` body (or anything else)."""
    reason = ""
    message = ""
    causes: list[dict[str, Any]] = []
    if isinstance(body, dict):
        reason = str(body.get("reason") or "")
        message = str(body.get("message") or "")
        details = body.get("details")
        if isinstance(details, dict) and isinstance(details.get("causes"), list):
            causes = [c for c in details["causes"] if isinstance(c, dict)]
    elif isinstance(body, str):
        message = body.strip()[:500]
    cls = error_class(status, reason)
    text = f"HTTP {status}" + (f" {reason}" if reason else "") + (f": {message}" if message else "")
    return cls(text, status=status, reason=reason, causes=causes, retry_after=retry_after)
