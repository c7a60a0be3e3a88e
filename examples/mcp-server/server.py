"""An MCP server whose tools need a Mayfly task token.

It is an OAuth 2.0 resource server as the MCP authorization spec asks: its
RFC 9728 metadata names Mayfly as the authorization server, and a request
without a valid token is answered 401 with ``resource_metadata``, both done
by the MCP SDK from ``AuthSettings``. It checks tokens one of two ways,
each refusing a token revoked a moment ago:

- by default with stock parts only (``IntrospectingVerifier``): the
  signature against the broker's JWKS with PyJWT, ``typ``, ``iss``, this
  server's ``aud``, the time claims, and then the broker's own word that
  the lease is still active (RFC 7662 introspection over mTLS) on every
  call;
- with ``--feed`` (the broker's gRPC URL), with the Mayfly SDK's
  ``Verifier`` (``FeedVerifier``): the same checks, with revocations
  learnt from the revocation feed this server follows, so no call waits
  for the broker.

Either way the server authenticates to the broker with its own SVID.

    python server.py --issuer https://localhost:8711 --resource http://127.0.0.1:8790/mcp \\
        --ca .mayfly-dev/bundle.pem --cert SVID.pem --key SVID.key [--feed https://localhost:8710]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ssl
from pathlib import Path
from typing import Any

import httpx
import jwt
import mayfly
import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken, TokenVerifier
from mcp.server.auth.settings import AuthSettings

#: What the tools need.
SCOPE = "read:tickets"
#: Algorithms Mayfly signs with; anything else (``none``, HS256) is refused.
ALGORITHMS = ["ES256", "EdDSA"]


class IntrospectingVerifier:
    """Checks Mayfly access tokens for one resource with PyJWT and the
    broker's introspection endpoint (the MCP SDK's ``TokenVerifier``)."""

    def __init__(self, issuer: str, resource: str, tls: ssl.SSLContext) -> None:
        self._issuer = issuer.rstrip("/")
        self._resource = resource
        self._jwks = jwt.PyJWKClient(f"{self._issuer}/.well-known/jwks.json", ssl_context=tls)
        # The server's own SVID is in `tls`: introspection is over mTLS.
        self._http = httpx.AsyncClient(verify=tls, timeout=5.0)

    async def verify_token(self, token: str) -> AccessToken | None:
        """The token's access, or ``None`` to refuse it."""
        try:
            if jwt.get_unverified_header(token).get("typ") != "at+jwt":
                return None
            # The JWKS fetch (cached by PyJWT) may block: off the event loop.
            key = await asyncio.to_thread(self._jwks.get_signing_key_from_jwt, token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=ALGORITHMS,
                audience=self._resource,
                issuer=self._issuer,
                leeway=30,
                options={"require": ["exp", "iat", "nbf", "iss", "aud", "sub", "jti"]},
            )
        except (jwt.PyJWTError, ValueError):
            return None
        if "cnf" in claims:
            # A bound token needs its key proven, which plain HTTP cannot
            # show: refused rather than accepted as a bearer token.
            return None
        if not await self._active(token):
            return None
        return AccessToken(
            token=token,
            client_id=str(claims["client_id"]),
            scopes=str(claims.get("scope", "")).split(),
            expires_at=int(claims["exp"]),
            resource=str(claims["aud"]),
            subject=str(claims["sub"]),
            claims=claims,
        )

    async def _active(self, token: str) -> bool:
        """Whether the broker still holds the token's lease active; a
        broker that cannot be asked refuses (fail closed)."""
        try:
            r = await self._http.post(f"{self._issuer}/introspect", data={"token": token})
        except httpx.HTTPError:
            return False
        return r.status_code == 200 and r.json().get("active") is True


class FeedVerifier:
    """Checks Mayfly access tokens with the Mayfly SDK's ``Verifier``,
    which follows the revocation feed (the MCP SDK's ``TokenVerifier``)."""

    def __init__(self, verifier: mayfly.Verifier) -> None:
        self._verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        """The token's access, or ``None`` to refuse it. Over plain HTTP no
        client certificate is seen, so a certificate-bound token is refused
        (``certificate_required``), never taken as a bearer token."""
        try:
            result = await self._verifier.averify(token)
        except mayfly.VerifyError:
            return None
        return AccessToken(
            token=token,
            client_id=result.agent,
            scopes=result.scopes,
            expires_at=result.expires_at,
            resource=result.audience,
            subject=result.agent,
            claims=result.claims,
        )


def build(issuer: str, resource: str, verifier: TokenVerifier) -> MCPServer:
    """The server, its one tool needing ``read:tickets``."""
    server = MCPServer(
        "mayfly-tickets",
        token_verifier=verifier,
        # Validated from strings, so the issuer keeps its exact form (no
        # trailing slash): clients compare issuers as strings (RFC 8414).
        auth=AuthSettings.model_validate(
            {
                "issuer_url": issuer,
                "resource_server_url": resource,
                "required_scopes": [SCOPE],
                # Both verifiers check `aud` themselves.
                "validate_token_resource": False,
            }
        ),
    )

    @server.tool()
    def summarise_ticket(ticket: int) -> str:
        """Summarises a ticket, for the task the caller's token belongs to."""
        access = get_access_token()
        claims = access.claims if access and access.claims else {}
        return (
            f"ticket {ticket}: printer on fire (for task {claims.get('task_id')}, "
            f"agent {claims.get('sub')})"
        )

    return server


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext:
    """Trusts the broker's CA and presents this server's SVID."""
    ctx = ssl.create_default_context(cafile=ca)
    ctx.load_cert_chain(cert, key)
    return ctx


def main() -> None:
    """Serves until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--issuer", required=True, help="the broker's issuer URL")
    p.add_argument("--resource", required=True, help="this server's URL: the tokens' audience")
    p.add_argument("--ca", required=True, help="PEM bundle the broker's certificate chains to")
    p.add_argument("--cert", required=True, help="this server's X.509-SVID, shown to the broker")
    p.add_argument("--key", required=True, help="its key")
    p.add_argument(
        "--feed", metavar="URL", help="the broker's gRPC URL: follow its revocation feed"
    )
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    with contextlib.ExitStack() as stack:
        verifier: TokenVerifier
        if args.feed:
            ca, cert, key = (Path(f).read_bytes() for f in (args.ca, args.cert, args.key))
            feed = mayfly.FeedConfig(args.feed, ca_pem=ca, cert_pem=cert, key_pem=key)
            sdk = mayfly.Verifier(issuer=args.issuer, audience=args.resource, ca=ca, feed=feed)
            # Entering it fetches the JWKS and starts following the feed.
            verifier = FeedVerifier(stack.enter_context(sdk))
        else:
            tls = tls_context(args.ca, args.cert, args.key)
            verifier = IntrospectingVerifier(args.issuer, args.resource, tls)
        server = build(args.issuer, args.resource, verifier)
        uvicorn.run(
            server.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning"
        )


if __name__ == "__main__":
    main()
