"""The example with the Mayfly SDK on both sides: the MCP server checking
tokens with the SDK's Verifier and the revocation feed, and the agent
opening its own task and calling the tool through the official MCP client;
a request without a token, with a bound one, or with a revoked one is
refused."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import mayfly

from agent import call_tool_in_task

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


def test_the_agent_calls_the_tool_under_its_own_task(broker: Broker, feed_server: str) -> None:
    out = asyncio.run(call_tool_in_task(feed_server, 42, str(broker.profile)))
    prefix, suffix = "ticket 42: printer on fire (for task ", f", agent {AGENT})"
    assert out.startswith(prefix), out
    assert out.endswith(suffix), out
    task_id = out[len(prefix) : -len(suffix)]
    # The task ended with the agent's block, and its token with it.
    leases = json.loads(broker.cli("--json", "lease", "list", "--task", task_id))
    assert {lease["kind"] for lease in leases} == {"task", "jwt"}
    assert {lease["state"] for lease in leases} == {"revoked"}


def test_no_token_a_bound_one_or_a_revoked_one_is_refused(broker: Broker, feed_server: str) -> None:
    r = httpx.post(feed_server, json=INITIALIZE, headers=MCP_HEADERS)
    assert r.status_code == 401
    assert "resource_metadata=" in r.headers["www-authenticate"]
    with mayfly.connect(profile=broker.profile) as b:
        task = b.start_task("one call", audiences=[feed_server], scopes=["read:tickets"])
        token = task.token(feed_server, ["read:tickets"], bind=False)
        auth = {**MCP_HEADERS, "Authorization": token.authorization}
        assert httpx.post(feed_server, json=INITIALIZE, headers=auth).status_code == 200
        # Bound to the agent's certificate, which plain HTTP cannot show.
        bound = task.token(feed_server, ["read:tickets"])
        bound_auth = {**MCP_HEADERS, "Authorization": bound.authorization}
        assert httpx.post(feed_server, json=INITIALIZE, headers=bound_auth).status_code == 401
        task.complete()
    # The revocation reaches the server over the feed, not per call.
    deadline = time.monotonic() + 10
    while httpx.post(feed_server, json=INITIALIZE, headers=auth).status_code != 401:
        assert time.monotonic() < deadline, "a revoked token was still accepted"
        time.sleep(0.01)
