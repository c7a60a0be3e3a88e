"""ASGI middleware (Starlette, FastAPI, any ASGI app) that lets through
only requests with a valid Mayfly token for this service, answering the
rest as RFC 6750 says:

- no token: 401, `WWW-Authenticate: Bearer realm=…` (plus
  `resource_metadata=…`, RFC 9728, when given, so MCP clients find the
  broker);
- a refused token: 401 with `error="invalid_token"` and the failed check
  as `error_description`;
- a token without a required scope: 403 `error="insufficient_scope"`;
- the verifier itself unable to decide (no JWKS, a silent feed): 503.

The verified token is at `request.state.mayfly` (`scope["state"]`).
Given `reports` (`mayfly.reports.RequestReports`), each request a token
came with is reported to the broker: accepted ones with their route
template (Starlette's, else the path; never the query) and status, and
refused ones with the check that refused them, when the token is one of
the issuer's for this audience.
Certificate-bound tokens need the client certificate, which the server
passes in the ASGI TLS extension (`scope["extensions"]["tls"]`); without
it they are refused (certificate_required), never accepted unbound."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import TYPE_CHECKING, Any

from mayfly.dpop import DpopRequest
from mayfly.errors import VerifyError
from mayfly.verify import VerifiedToken, Verifier

if TYPE_CHECKING:
    from mayfly.reports import RequestReports

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]


def _quote(s: str) -> str:
    return s.replace("\\", "\\\\").replace('"', '\\"')


class TokenMiddleware:
    """Wraps `app`; `exempt` paths (e.g. health, RFC 9728 metadata) pass
    without a token. Start `verifier` (`start()`, `wait_for_feed()`)
    before serving; else the first request starts it, and with a feed
    not yet synced is answered 503."""

    def __init__(
        self,
        app: App,
        verifier: Verifier,
        *,
        scopes: Sequence[str] = (),
        resource_metadata: str | None = None,
        exempt: Sequence[str] = ("/.well-known/oauth-protected-resource",),
        reports: RequestReports | None = None,
    ) -> None:
        self.app = app
        self.verifier = verifier
        self.reports = reports
        self.scopes = list(scopes)
        self.resource_metadata = resource_metadata
        self.exempt = set(exempt)

    def _challenge(self, scheme: str, error: str | None, description: str | None) -> str:
        parts = ['realm="mayfly"']
        if self.resource_metadata:
            parts.append(f'resource_metadata="{_quote(self.resource_metadata)}"')
        if error:
            parts.append(f'error="{error}"')
        if description:
            parts.append(f'error_description="{_quote(description)}"')
        if error == "insufficient_scope" and self.scopes:
            parts.append(f'scope="{_quote(" ".join(self.scopes))}"')
        out = f"{scheme} " + ", ".join(parts)
        if scheme == "Bearer":
            out += ', DPoP algs="ES256 EdDSA"'
        return out

    async def _refuse(self, send: Send, status: int, challenge: str | None, body: str) -> None:
        headers = [(b"content-type", b"text/plain; charset=utf-8")]
        if challenge:
            headers.append((b"www-authenticate", challenge.encode("latin-1", "replace")))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body.encode()})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in self.exempt:
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        scheme = scheme.lower()
        token = token.strip()
        if scheme not in ("bearer", "dpop") or not token:
            await self._refuse(send, 401, self._challenge("Bearer", None, None), "token required")
            return
        dpop: DpopRequest | None = None
        if scheme == "dpop":
            proof = headers.get("dpop")
            if not proof:
                challenge = self._challenge("DPoP", "invalid_token", "DPoP proof missing")
                await self._refuse(send, 401, challenge, "DPoP proof missing")
                return
            dpop = DpopRequest(proof, scope["method"], _request_url(scope, headers))
        tls = (scope.get("extensions") or {}).get("tls") or {}
        chain = tls.get("client_cert_chain") or []
        client_cert = chain[0] if chain else None
        started = time.monotonic()
        try:
            result = await self.verifier.averify(token, client_cert=client_cert, dpop=dpop)
        except VerifyError as e:
            if e.server_side:
                await self._refuse(send, 503, None, "token verification unavailable; retry")
                return
            challenge = self._challenge("DPoP" if dpop else "Bearer", "invalid_token", e.check)
            await self._refuse(send, 401, challenge, f"invalid token: {e.check}")
            lease = self.verifier.refused_lease(token) if self.reports is not None else None
            if lease is not None:
                self._report(scope, lease, 401, started, e.check)
            return
        missing = [s for s in self.scopes if not result.has_scope(s)]
        if missing:
            challenge = self._challenge("Bearer", "insufficient_scope", None)
            await self._refuse(send, 403, challenge, f"scope {' '.join(missing)} required")
            if self.reports is not None:
                self._report(scope, result.lease_id, 403, started, None)
            return
        scope.setdefault("state", {})["mayfly"] = result
        if self.reports is None:
            await self.app(scope, receive, send)
            return
        status = 500

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            self._report(scope, result.lease_id, status, started, None)

    def _report(
        self, scope: Scope, lease: str, status: int, started: float, refused: str | None
    ) -> None:
        if self.reports is None:
            return
        route = getattr(scope.get("route"), "path", None)
        self.reports.report(
            lease_id=lease,
            method=str(scope.get("method", "")),
            route=route if isinstance(route, str) else str(scope.get("path", "")),
            status=status,
            latency_us=int((time.monotonic() - started) * 1_000_000),
            refused_because=refused,
        )


def _request_url(scope: Scope, headers: dict[str, str]) -> str:
    host = headers.get("host")
    if host is None:
        server = scope.get("server") or ("localhost", None)
        host = f"{server[0]}:{server[1]}" if server[1] else str(server[0])
    return f"{scope.get('scheme', 'http')}://{host}{scope.get('root_path', '')}{scope['path']}"


def token_of(state: object) -> VerifiedToken:
    """The verified token of a request (`token_of(request.state)`)."""
    token = getattr(state, "mayfly", None)
    if not isinstance(token, VerifiedToken):
        raise LookupError("no verified Mayfly token: is TokenMiddleware in front of this app?")
    return token
