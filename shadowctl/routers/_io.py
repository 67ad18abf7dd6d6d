"""The read-compute-write-verify loop every router uses, and the mapping of KubeErrors to RouterErrors.

Why a PUT of the whole object rather than a patch: the builders compute the
whole object from the version they read, and a PUT carrying that version's
``resourceVersion`` is refused (409) if anything changed in between, so no
write can be based on a stale read. On 409 the loop reads again and recomputes
from the new version; it never retries the same body.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable, Iterator
from contextvars import ContextVar

import structlog

from shadowctl.kube.client import KubeClient
from shadowctl.kube.errors import Conflict, Invalid, KubeError, NotFound
from shadowctl.kube.refs import ResourceRef
from shadowctl.routers.base import (
    ApplyResult,
    ClusterError,
    ConflictRetriesExhausted,
    RouteNotFound,
    RouterError,
    RouteState,
    VerifyFailed,
    WouldBeRejected,
)
from shadowctl.routers.record import JSON, Build

log = structlog.get_logger(__name__)

DEFAULT_ATTEMPTS = 5

Compute = Callable[[JSON], Build]
Check = Callable[[JSON], str | None]
StateOf = Callable[[JSON], RouteState]
Fence = Callable[[str, JSON | None], Awaitable[None]]
"""Called with ``Kind namespace/name`` and the object as read (the write is conditional on its
resourceVersion, so a check of the object here is atomic with the write; None for a write that is not
of an API object) right before a write; raises :class:`Superseded` to stop it."""

_FENCE: ContextVar[Fence | None] = ContextVar("shadowctl_route_fence", default=None)


class Superseded(RouterError):
    """A fence refused the write: what the caller decided from changed (or it lost the Lease); nothing was
    written by this attempt. Not a failure of the object: re-read and decide again."""


@contextlib.contextmanager
def fenced(fence: Fence | None) -> Iterator[None]:
    """Run every :func:`converge` write inside the block only after ``fence(what, current)`` passes."""
    token = _FENCE.set(fence)
    try:
        yield
    finally:
        _FENCE.reset(token)


async def check_fence(what: str) -> None:
    """Run the active fence (if any) for a write that is not a :func:`converge` (the tap router's publish)."""
    fence = _FENCE.get()
    if fence is not None:
        await fence(what, None)


def _what(ref: ResourceRef) -> str:
    return f"{ref.gvr.kind or ref.gvr.plural} {ref.namespace}/{ref.name}"


async def get(kube: KubeClient, ref: ResourceRef) -> JSON:
    """GET the object; RouteNotFound when it does not exist, ClusterError for other API failures."""
    try:
        return await kube.get(ref)
    except NotFound as exc:
        raise RouteNotFound(f"{_what(ref)} not found") from exc
    except KubeError as exc:
        raise ClusterError(f"reading {_what(ref)}: {exc.message}") from exc


async def converge(
    kube: KubeClient,
    ref: ResourceRef,
    compute: Compute,
    state_of: StateOf,
    *,
    check: Check | None = None,
    attempts: int = DEFAULT_ATTEMPTS,
) -> ApplyResult:
    """Read, compute, write only when modified (with the read's resourceVersion), read back and verify.

    ``check(read_back)`` returns a problem or None; by default the read-back is
    verified by computing again: it must need no further change.
    """
    what = _what(ref)
    last_conflict: Conflict | None = None
    for attempt in range(1, attempts + 1):
        current = await get(kube, ref)
        new, modified = compute(current)
        if not modified:
            return ApplyResult(False, state_of(current), None, attempt, ())
        fence = _FENCE.get()
        if fence is not None:
            await fence(what, current)  # the last await before the write: as close to it as the client allows
        try:
            written = await kube.replace(ref.gvr, new)
        except Conflict as exc:
            last_conflict = exc
            log.info("router.conflict", object=what, attempt=attempt, error=exc.message)
            continue
        except Invalid as exc:
            causes = "; ".join(str(c.get("message") or c.get("field")) for c in exc.causes) or exc.message
            raise WouldBeRejected(f"the API server rejected the new {what}: {causes}") from exc
        except NotFound as exc:
            raise RouteNotFound(f"{what} was deleted while shadowctl was changing it") from exc
        except KubeError as exc:
            raise ClusterError(f"writing {what}: {exc.message}") from exc
        after = await get(kube, ref)
        problem = check(after) if check is not None else _recompute_check(compute, after)
        if problem:
            raise VerifyFailed(f"{what} was written but reads back differently: {problem}")
        state = state_of(after)
        log.info("router.wrote", object=what, attempt=attempt, state=state.describe(),
                 resource_version=(after.get("metadata") or {}).get("resourceVersion"))
        return ApplyResult(True, state, written, attempt, (what,))
    raise ConflictRetriesExhausted(
        f"{what}: {attempts} writes in a row met a newer version (409 Conflict): another writer keeps "
        "changing it; nothing was written"
    ) from last_conflict


def _recompute_check(compute: Compute, after: JSON) -> str | None:
    _, modified = compute(after)
    if not modified:
        return None
    return "computing the routes again from the read-back would change them (a webhook or another writer edited them)"
