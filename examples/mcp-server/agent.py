"""An agent that calls an MCP server's tool with a Mayfly task token.

It gets the token one of two ways. With ``--task``, through the official
MCP SDK's own OAuth flow end to end: the SDK's client meets the server's
401, reads its RFC 9728 metadata, finds Mayfly's RFC 8414 metadata, and
asks the token endpoint it names for a token for the server (RFC 8707
``resource``). ``MayflyTaskAuth`` only says what Mayfly needs beyond a
stock client-credentials request: the task the token is for
(``task_id``), the agent's X.509-SVID as client authentication
(``tls_client_auth``, presented by the HTTP client), and a bearer token,
which an MCP client can hand on.

    TASK=$(mayfly --json task start --intent "summarise ticket 42" \\
        --audience http://127.0.0.1:8790/mcp --scope read:tickets | jq -r .task_id)
    python agent.py --server http://127.0.0.1:8790/mcp --issuer https://localhost:8711 \\
        --task $TASK --ca .mayfly-dev/bundle.pem \\
        --cert .mayfly-dev/identities/agent-demo/svid.pem \\
        --key .mayfly-dev/identities/agent-demo/svid.key

Without it, with the Mayfly SDK: the agent opens a task of its own, takes
a token for the server and calls the tool with it; leaving the task block
completes the task, which revokes the token.

    python agent.py --server http://127.0.0.1:8790/mcp   # where .mayfly-dev is
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from collections.abc import Coroutine
from typing import Any

import httpx2
import mayfly
from cryptography import x509
from mcp.client.auth.extensions.client_credentials import ClientCredentialsOAuthProvider
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.auth import OAuthClientInformationFull, OAuthToken

#: What the agent asks for: the server's one tool needs it.
SCOPE = "read:tickets"


class MemoryStorage:
    """Tokens for one run (the SDK's ``TokenStorage``)."""

    def __init__(self) -> None:
        self.tokens: OAuthToken | None = None
        self.client: OAuthClientInformationFull | None = None

    async def get_tokens(self) -> OAuthToken | None:
        return self.tokens

    async def set_tokens(self, tokens: OAuthToken) -> None:
        self.tokens = tokens

    async def get_client_info(self) -> OAuthClientInformationFull | None:
        return self.client

    async def set_client_info(self, client_info: OAuthClientInformationFull) -> None:
        self.client = client_info


def spiffe_id(cert_pem: bytes) -> str:
    """The SPIFFE ID of an X.509-SVID: its one URI SAN."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    (uri,) = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    return str(uri)


class MayflyTaskAuth(ClientCredentialsOAuthProvider):
    """The SDK's client-credentials flow, for a Mayfly task."""

    def __init__(self, server_url: str, issuer: str, task_id: str, agent: str, scope: str) -> None:
        super().__init__(
            server_url,
            MemoryStorage(),
            client_id=agent,
            # Mayfly authenticates the client by its certificate (RFC 8705),
            # never by a secret.
            client_secret="",
            scope=scope,
            issuer=issuer,
        )
        self._task_id = task_id
        self._agent = agent
        self._scope = scope

    async def _exchange_token_client_credentials(self) -> httpx2.Request:
        data: dict[str, Any] = {
            "grant_type": "client_credentials",
            "client_id": self._agent,
            "task_id": self._task_id,
            "resource": self.context.get_resource_url(),
            "scope": self._scope,
            # An MCP client sends what it gets as a bearer token.
            "token_binding": "none",
        }
        return httpx2.Request("POST", self._get_token_endpoint(), data=data)


async def summarise_ticket(http: httpx2.AsyncClient, server: str, ticket: int) -> str:
    """Calls ``summarise_ticket`` on ``server`` through ``http``, which
    carries the token (or knows how to get one)."""
    async with (
        streamable_http_client(server, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        result = await session.call_tool("summarise_ticket", {"ticket": ticket})
        texts = [c.text for c in result.content if c.type == "text"]
        if result.is_error:
            raise RuntimeError(f"the tool failed: {texts}")
        return "\n".join(texts)


async def call_tool(
    server: str, issuer: str, task_id: str, tls: ssl.SSLContext, agent: str, ticket: int
) -> str:
    """The tool's answer under ``task_id``, the token got by the MCP SDK's
    OAuth flow."""
    auth = MayflyTaskAuth(server, issuer, task_id, agent, SCOPE)
    async with httpx2.AsyncClient(verify=tls, auth=auth, timeout=10.0) as http:
        return await summarise_ticket(http, server, ticket)


async def call_tool_in_task(server: str, ticket: int, profile: str | None = None) -> str:
    """The tool's answer under a task the agent opens with the Mayfly SDK
    (its broker and SVID from ``profile``, by default ``./.mayfly-dev``)
    and completes on the way out."""
    async with (
        mayfly.connect(profile=profile) as broker,
        broker.task(f"summarise ticket {ticket}", audiences=[server], scopes=[SCOPE]) as task,
    ):
        # Bound to nothing: the MCP transport is plain HTTP here, so the
        # server could not see the agent's certificate.
        token = await task.token(server, [SCOPE], bind=False)
        headers = {"Authorization": token.authorization}
        async with httpx2.AsyncClient(headers=headers, timeout=10.0) as http:
            return await summarise_ticket(http, server, ticket)


def run(call: Coroutine[Any, Any, str]) -> None:
    """Prints the tool's answer, or exits with what refused it in one line
    (the MCP client reports a failure inside its task group as an
    exception group: the first exception in it says what went wrong, for
    example a 401 once the task has ended and its token is revoked)."""
    try:
        print(asyncio.run(call))
    except Exception as e:
        # An exception group (3.11's, or anyio's backport on 3.10) holds
        # its members in `exceptions`.
        cause: BaseException = e
        while inner := getattr(cause, "exceptions", None):
            cause = inner[0]
        sys.exit(f"agent: {cause}")


def main() -> None:
    """One tool call."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--server", required=True, help="the MCP server's URL")
    p.add_argument("--ticket", type=int, default=42)
    p.add_argument("--profile", help="without --task: a `mayfly dev init` directory")
    oauth = p.add_argument_group("the MCP SDK's OAuth flow, for a task opened elsewhere")
    oauth.add_argument("--task", help="the task the token is for")
    oauth.add_argument("--issuer", help="the Mayfly issuer to trust")
    oauth.add_argument("--ca", help="PEM bundle the broker's certificate chains to")
    oauth.add_argument("--cert", help="the agent's X.509-SVID")
    oauth.add_argument("--key", help="its key")
    args = p.parse_args()
    if args.task is None:
        run(call_tool_in_task(args.server, args.ticket, args.profile))
        return
    missing = [f"--{n}" for n in ("issuer", "ca", "cert", "key") if getattr(args, n) is None]
    if missing:
        p.error(f"--task needs {' '.join(missing)}")
    tls = ssl.create_default_context(cafile=args.ca)
    tls.load_cert_chain(args.cert, args.key)
    with open(args.cert, "rb") as f:
        agent = spiffe_id(f.read())
    run(call_tool(args.server, args.issuer, args.task, tls, agent, args.ticket))


if __name__ == "__main__":
    main()
