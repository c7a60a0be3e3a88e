"""An MCP server whose tools need a Mayfly task token.

It is an OAuth 2.0 resource server as the MCP authorization spec asks: its
RFC 9728 metadata names Mayfly as the authorization server, and a request
without a valid token is answered 401 with ``resource_metadata``, both done
by the MCP SDK from ``AuthSettings``. The token check is Mayfly's
(``MayflyVerifier``): the signature against the broker's JWKS with PyJWT,
``typ``, ``iss``, this server's ``aud``, the time claims, and then the
broker's own word that the lease is still active (RFC 7662 introspection
over mTLS), so a token revoked a moment ago is refused.

    python server.py --issuer https://localhost:8711 --resource http://127.0.0.1:8790/mcp \\
        --ca .mayfly-dev/bundle.pem --cert SVID.pem --key SVID.key
"""

from __future__ import annotations

import argparse
import ssl
from typing import Any

import anyio.to_thread
import httpx
import jwt
import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

#: What the tools need.
SCOPE = "read:tickets"
#: Algorithms Mayfly signs with; anything else (``none``, HS256) is refused.
ALGORITHMS = ["ES256", "EdDSA"]


class MayflyVerifier:
    """Checks Mayfly access tokens for one resource (the MCP SDK's
    ``TokenVerifier``)."""

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
            key = await anyio.to_thread.run_sync(self._jwks.get_signing_key_from_jwt, token)
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


def build(issuer: str, resource: str, tls: ssl.SSLContext) -> MCPServer:
    """The server, its one tool needing ``read:tickets``."""
    server = MCPServer(
        "mayfly-tickets",
        token_verifier=MayflyVerifier(issuer, resource, tls),
        # Validated from strings, so the issuer keeps its exact form (no
        # trailing slash): clients compare issuers as strings (RFC 8414).
        auth=AuthSettings.model_validate(
            {
                "issuer_url": issuer,
                "resource_server_url": resource,
                "required_scopes": [SCOPE],
                # The verifier checks `aud` itself (PyJWT's audience check).
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
    p.add_argument("--cert", required=True, help="this server's X.509-SVID (introspection)")
    p.add_argument("--key", required=True, help="its key")
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    server = build(args.issuer, args.resource, tls_context(args.ca, args.cert, args.key))
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
