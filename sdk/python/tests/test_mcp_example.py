"""examples/: the MCP tool server checking tokens with the SDK's Verifier,
and the agent that opens a task and calls its tool through the official MCP
client; a request without a token, or with a revoked one, is refused."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

import mayfly
from examples.mcp_agent import summarise
from tests.conftest import Broker

HERE = Path(__file__).resolve().parents[1]
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


@pytest.fixture(scope="module")
def server(broker: Broker) -> Iterator[str]:
    port = urlsplit(broker.mcp_resource).port
    assert port is not None
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE / "src"), str(HERE)])}
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "examples" / "mcp_tools.py"),
            "--profile",
            str(broker.profile),
            "--identity",
            "api-tickets",
            "--issuer",
            broker.issuer,
            "--resource",
            broker.mcp_resource,
            "--port",
            str(port),
        ],
        env=env,
    )
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"the MCP server exited with {proc.returncode}"
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert time.monotonic() < deadline, "the MCP server did not listen"
            time.sleep(0.1)
    try:
        yield broker.mcp_resource
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_the_agent_calls_the_tool_under_its_task(broker: Broker, server: str) -> None:
    out = asyncio.run(summarise(server, 42, str(broker.profile)))
    assert out.startswith("ticket 42: printer on fire (task ")
    task_id = out.rsplit(" ", 1)[1].rstrip(")")
    # The task ended with the agent's block, and its token with it.
    leases = broker.cli_json("lease", "list", "--task", task_id)
    assert leases
    assert {lease["state"] for lease in leases} == {"revoked"}


def test_no_token_or_a_revoked_one_is_refused(broker: Broker, server: str) -> None:
    r = httpx.post(server, json=INITIALIZE, headers=MCP_HEADERS)
    assert r.status_code == 401
    assert "resource_metadata=" in r.headers["www-authenticate"]
    with mayfly.connect(profile=broker.profile) as b:
        task = b.start_task("one call", audiences=[server], scopes=["read:tickets"])
        token = task.token(server, ["read:tickets"], bind=False)
        auth = {**MCP_HEADERS, "Authorization": token.authorization}
        assert httpx.post(server, json=INITIALIZE, headers=auth).status_code == 200
        # Bound to the agent's certificate, which plain HTTP cannot show.
        bound = task.token(server, ["read:tickets"])
        bound_auth = {**MCP_HEADERS, "Authorization": bound.authorization}
        assert httpx.post(server, json=INITIALIZE, headers=bound_auth).status_code == 401
        task.complete()
    deadline = time.monotonic() + 10
    while httpx.post(server, json=INITIALIZE, headers=auth).status_code != 401:
        assert time.monotonic() < deadline, "a revoked token was still accepted"
        time.sleep(0.01)
