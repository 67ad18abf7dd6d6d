"""A TLS reverse proxy that checks a bearer token in front of a Prometheus (what kube-rbac-proxy does).

Prometheus itself has no bearer-token authentication (its web config knows TLS and basic
auth); a deployment that hands out tokens puts a proxy in front of it (kube-rbac-proxy,
oauth2-proxy, an ingress) or uses a service that checks them (Thanos or Mimir behind a
gateway, a managed Prometheus). This stand-in terminates TLS with a certificate from a
:class:`~shadowctl.sim.pki.LocalCA`, answers 401 unless ``Authorization: Bearer <token>``
carries one of :attr:`BearerProxy.tokens` (a rotation replaces them), and forwards the
request to the upstream Prometheus on the loopback.
"""

from __future__ import annotations

import hmac
import ssl

import aiohttp
from aiohttp import web

from shadowctl.sim.pki import CertFiles

_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding",
                  "host", "authorization"})


class BearerProxy:
    """Listens on ``host`` (a free port) with TLS; :attr:`url` once :meth:`start` returned."""

    def __init__(self, upstream: str, serving: CertFiles, tokens: set[str], host: str = "127.0.0.1") -> None:
        self.upstream = upstream.rstrip("/")
        self.tokens = set(tokens)
        """Tokens accepted now; replace to rotate."""
        self.host = host
        self.refused = 0
        self.forwarded = 0
        self._ssl = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ssl.load_cert_chain(str(serving.cert), str(serving.key))
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    def _allowed(self, header: str) -> bool:
        scheme, _, token = header.partition(" ")
        return scheme.lower() == "bearer" and any(hmac.compare_digest(token.strip(), t) for t in self.tokens)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        if not self._allowed(request.headers.get("Authorization", "")):
            self.refused += 1
            return web.Response(status=401, text="Unauthorized\n", headers={"WWW-Authenticate": "Bearer"})
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        async with self._session.request(request.method, self.upstream + request.rel_url.path_qs, headers=headers,
                                         data=await request.read()) as answer:
            body = await answer.read()
            self.forwarded += 1
            return web.Response(status=answer.status, body=body,
                                content_type=answer.content_type or "application/octet-stream")

    async def start(self) -> str:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, 0, ssl_context=self._ssl)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"https://{self.host}:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
