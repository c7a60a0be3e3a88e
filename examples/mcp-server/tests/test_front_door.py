"""Mayfly's OAuth front door with clients nobody here wrote: httpx as a
stock OAuth client that knows only the metadata document, PyJWT checking
what it gets against the JWKS, and the official MCP SDK finding Mayfly
through an MCP server and calling a tool."""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import Any

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from agent import call_tool, run, spiffe_id

from .conftest import AGENT, Broker

INITIALIZE = {
    "jsonrpc": "2.0",
    "id": 1,
    "method": "initialize",
    "params": {
        "protocolVersion": "2025-06-18",
        "capabilities": {},
        "clientInfo": {"name": "test", "version": "1"},
    },
}
MCP_HEADERS = {"Accept": "application/json, text/event-stream"}


def metadata(broker: Broker) -> dict[str, Any]:
    """The broker's RFC 8414 document: the only thing the client is told."""
    r = httpx.get(
        f"{broker.issuer}/.well-known/oauth-authorization-server", verify=broker.tls("agent-demo")
    )
    r.raise_for_status()
    doc: dict[str, Any] = r.json()
    return doc


def token(broker: Broker, form: dict[str, str]) -> httpx.Response:
    """POSTs `form` to the token endpoint the metadata names, as the agent."""
    return httpx.post(
        metadata(broker)["token_endpoint"], data=form, verify=broker.tls("agent-demo")
    )


def ask(broker: Broker, task: str, **extra: str) -> httpx.Response:
    """A client_credentials request for a read-only token for the MCP
    server under `task`, with `extra` parameters."""
    form = {
        "grant_type": "client_credentials",
        "task_id": task,
        "resource": broker.resource,
        "scope": "read:tickets",
        **extra,
    }
    return token(broker, form)


def test_a_stock_oauth_client_gets_a_token_from_the_metadata_alone(
    broker: Broker, task: str
) -> None:
    meta = metadata(broker)
    assert "client_credentials" in meta["grant_types_supported"]
    assert meta["token_endpoint_auth_methods_supported"] == ["tls_client_auth"]
    r = ask(broker, task)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    body = r.json()
    assert body["token_type"] == "Bearer"
    assert body["scope"] == "read:tickets"

    # PyJWT, with the keys from the JWKS the metadata names.
    jwks = jwt.PyJWKClient(meta["jwks_uri"], ssl_context=broker.tls("agent-demo"))
    key = jwks.get_signing_key_from_jwt(body["access_token"])
    claims = jwt.decode(
        body["access_token"],
        key,
        algorithms=["ES256", "EdDSA"],
        audience=broker.resource,
        issuer=meta["issuer"],
        options={"require": ["exp", "iat", "nbf", "jti", "sub"]},
    )
    assert jwt.get_unverified_header(body["access_token"])["typ"] == "at+jwt"
    assert claims["task_id"] == task
    assert claims["sub"] == AGENT
    # Bound to the certificate the client authenticated with (RFC 8705).
    cert_pem, _ = broker.identity("agent-demo")
    with open(cert_pem, "rb") as f:
        der = x509.load_pem_x509_certificate(f.read()).public_bytes(Encoding.DER)
    want = base64.urlsafe_b64encode(hashlib.sha256(der).digest()).rstrip(b"=").decode()
    assert claims["cnf"] == {"x5t#S256": want}


CC = "client_credentials"


@pytest.mark.parametrize(
    ("form", "error"),
    [
        ({"grant_type": CC, "resource": "R"}, "invalid_request"),
        ({"grant_type": "password", "username": "u", "password": "p"}, "unsupported_grant_type"),
        ({"grant_type": CC, "task_id": "T", "resource": "R", "scope": "write:x"}, "invalid_scope"),
        ({"grant_type": CC, "task_id": "T", "resource": "https://else.example"}, "invalid_target"),
    ],
)
def test_the_rfc_6749_errors_reach_a_stock_client(
    broker: Broker, task: str, form: dict[str, str], error: str
) -> None:
    form = {k: v.replace("T", task) if k == "task_id" else v for k, v in form.items()}
    form = {k: broker.resource if v == "R" else v for k, v in form.items()}
    r = token(broker, form)
    assert r.status_code == 400, r.text
    assert r.json()["error"] == error


def test_the_mcp_sdk_finds_mayfly_and_calls_a_tool(
    broker: Broker, mcp_server: str, task: str
) -> None:
    # Without a token the server says where to get one (RFC 9728).
    r = httpx.post(mcp_server, json=INITIALIZE, headers=MCP_HEADERS)
    assert r.status_code == 401
    assert "resource_metadata=" in r.headers["www-authenticate"]

    cert, _ = broker.identity("agent-demo")
    with open(cert, "rb") as f:
        agent = spiffe_id(f.read())
    text = asyncio.run(
        call_tool(mcp_server, broker.issuer, task, broker.tls("agent-demo"), agent, 42)
    )
    assert text == f"ticket 42: printer on fire (for task {task}, agent {AGENT})"


def bearer(broker: Broker, task: str) -> str:
    r = ask(broker, task, token_binding="none")
    assert r.status_code == 200, r.text
    access: str = r.json()["access_token"]
    return access


def test_the_tool_server_refuses_a_token_the_moment_it_is_revoked(
    broker: Broker, mcp_server: str, task: str
) -> None:
    t = bearer(broker, task)
    headers = {**MCP_HEADERS, "Authorization": f"Bearer {t}"}
    assert httpx.post(mcp_server, json=INITIALIZE, headers=headers).status_code == 200
    jti = jwt.decode(t, options={"verify_signature": False})["jti"]
    broker.cli("lease", "revoke", jti)
    r = httpx.post(mcp_server, json=INITIALIZE, headers=headers)
    assert r.status_code == 401
    assert 'error="invalid_token"' in r.headers["www-authenticate"]


def test_the_tool_server_refuses_bound_foreign_and_forged_tokens(
    broker: Broker, mcp_server: str, task: str
) -> None:
    bound = ask(broker, task).json()["access_token"]
    header, payload, sig = bearer(broker, task).split(".")
    forged = f"{header}.{payload}x.{sig}"
    for t in [bound, forged, "not-a-token"]:
        r = httpx.post(
            mcp_server, json=INITIALIZE, headers={**MCP_HEADERS, "Authorization": f"Bearer {t}"}
        )
        assert r.status_code == 401, t


class _Group(Exception):
    """Stands in for an exception group (3.11's or anyio's)."""

    def __init__(self, *inner: BaseException) -> None:
        super().__init__("unhandled errors in a TaskGroup")
        self.exceptions = inner


def test_a_refused_call_ends_the_agent_with_what_refused_it() -> None:
    async def refused() -> str:
        raise _Group(_Group(RuntimeError("401 Unauthorized: the task has ended")))

    with pytest.raises(SystemExit) as ended:
        run(refused())
    assert ended.value.code == "agent: 401 Unauthorized: the task has ended"
