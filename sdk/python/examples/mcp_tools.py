"""An MCP tool server (the official `mcp` package) whose tools check Mayfly
tokens with the SDK's `Verifier`: the JWKS, every claim, and the
revocation feed (this server follows it with its own SVID), so a token
revoked a moment ago is refused without asking the broker per call.

The MCP SDK serves the RFC 9728 metadata naming Mayfly and answers a
request without a valid token with 401 and `resource_metadata`.

    python mcp_tools.py --profile .mayfly-dev --identity api-tickets \\
        --issuer https://localhost:8711 --resource http://127.0.0.1:8790/mcp
"""

from __future__ import annotations

import argparse

import uvicorn
from mcp.server import MCPServer
from mcp.server.auth.middleware.auth_context import get_access_token
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings

import mayfly

#: What the tools need.
SCOPE = "read:tickets"


class SdkTokenVerifier:
    """The MCP SDK's `TokenVerifier`, backed by `mayfly.Verifier`."""

    def __init__(self, verifier: mayfly.Verifier) -> None:
        self._verifier = verifier

    async def verify_token(self, token: str) -> AccessToken | None:
        """The token's access, or None to refuse it. Over plain HTTP no
        client certificate is seen, so a certificate-bound token is refused
        (certificate_required), never taken as a bearer token."""
        result = await self._verifier.averify(token)
        if isinstance(result, mayfly.VerifyError):
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


def build(verifier: mayfly.Verifier, issuer: str) -> MCPServer:
    """The server and its one tool, which needs `read:tickets`."""
    server = MCPServer(
        "mayfly-tickets",
        token_verifier=SdkTokenVerifier(verifier),
        auth=AuthSettings.model_validate(
            {
                "issuer_url": issuer,
                "resource_server_url": verifier.audience,
                "required_scopes": [SCOPE],
                # The Verifier checks `aud` itself.
                "validate_token_resource": False,
            }
        ),
    )

    @server.tool()
    def summarise_ticket(ticket: int) -> str:
        """Summarises a ticket, for the task the caller's token belongs to."""
        access = get_access_token()
        claims = access.claims if access and access.claims else {}
        return f"ticket {ticket}: printer on fire (task {claims.get('task_id')})"

    return server


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--profile", required=True, help="a `mayfly dev init` directory")
    p.add_argument("--identity", required=True, help="this server's identity in it")
    p.add_argument("--issuer", required=True, help="the broker's issuer URL")
    p.add_argument("--resource", required=True, help="this server's URL: the tokens' audience")
    p.add_argument("--port", type=int, default=8790)
    args = p.parse_args()
    feed = mayfly.FeedConfig.from_profile(args.profile, args.identity)
    with mayfly.Verifier(
        issuer=args.issuer, audience=args.resource, ca=feed.ca_pem, feed=feed
    ) as verifier:
        server = build(verifier, args.issuer)
        uvicorn.run(
            server.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning"
        )


if __name__ == "__main__":
    main()
