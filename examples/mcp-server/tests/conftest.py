"""Fixtures: a real broker from this repository's `mayfly` binary (a fresh
`mayfly dev init` profile on free ports) and the example MCP server in
front of it, checking tokens either way it can (by introspection, or
following the revocation feed), each a process of its own."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

HERE = Path(__file__).resolve().parent.parent
REPO = HERE.parent.parent
TRUST_DOMAIN = "example.org"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/demo"
MCP_SERVER_ID = f"spiffe://{TRUST_DOMAIN}/api/mcp"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_for_port(port: int, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.1)
    pytest.fail(f"{what} did not listen on {port}")


def mayfly_bin() -> str:
    path = os.environ.get("MAYFLY_BIN") or str(REPO / "target" / "debug" / "mayfly")
    if not Path(path).exists():
        pytest.fail(f"no mayfly binary at {path}: `cargo build -p mayfly-cli`, or set MAYFLY_BIN")
    return path


@dataclass
class Broker:
    """A running broker and its dev profile."""

    profile: Path
    issuer: str
    grpc_url: str
    # The MCP servers' URLs (the tokens' audiences): checking by
    # introspection, and following the feed.
    resource: str
    feed_resource: str

    @property
    def ca(self) -> str:
        return str(self.profile / "bundle.pem")

    def identity(self, name: str) -> tuple[str, str]:
        d = self.profile / "identities" / name
        return str(d / "svid.pem"), str(d / "svid.key")

    def tls(self, identity: str) -> ssl.SSLContext:
        """Trusts the dev CA and presents `identity`'s SVID."""
        ctx = ssl.create_default_context(cafile=self.ca)
        ctx.load_cert_chain(*self.identity(identity))
        return ctx

    def cli(self, *args: str) -> str:
        """`mayfly --profile … ARGS`, its output."""
        done = subprocess.run(
            [mayfly_bin(), "--profile", str(self.profile), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    profile = tmp_path_factory.mktemp("broker") / ".mayfly-dev"
    subprocess.run([mayfly_bin(), "dev", "init", "--dir", str(profile)], check=True)
    subprocess.run(
        [mayfly_bin(), "dev", "identity", "--dir", str(profile), MCP_SERVER_ID], check=True
    )
    grpc, http = free_port(), free_port()
    resource = f"http://127.0.0.1:{free_port()}/mcp"
    feed_resource = f"http://127.0.0.1:{free_port()}/mcp"
    config = profile / "mayfly.toml"
    text = (
        config.read_text()
        .replace("127.0.0.1:8710", f"127.0.0.1:{grpc}")
        .replace("127.0.0.1:8711", f"127.0.0.1:{http}")
        .replace("localhost:8711", f"localhost:{http}")
    )
    # The MCP server introspects the tokens sent to it.
    text += f'\n[[introspection]]\nclients = ["{MCP_SERVER_ID}"]\naudiences = ["{resource}"]\n'
    config.write_text(text)
    (profile / "profile.toml").write_text(
        (profile / "profile.toml").read_text().replace("localhost:8710", f"localhost:{grpc}")
    )
    # The dev agent may work with the MCP servers, read-only.
    (profile / "policies" / "mcp.cedar").write_text(
        "".join(
            f"""
@id("mcp-tickets-{i}")
permit (
  principal in Mayfly::Path::"spiffe://{TRUST_DOMAIN}/agent",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource == Mayfly::Audience::"{url}"
)
when {{ ["read"].containsAll(context.scope_prefixes) }};
"""
            for i, url in enumerate([resource, feed_resource])
        )
    )
    log = (profile / "broker.log").open("wb")
    proc = subprocess.Popen(
        [mayfly_bin(), "serve", "--config", str(config)], stdout=log, stderr=log
    )
    try:
        wait_for_port(http, proc, "the broker")
        yield Broker(
            profile,
            f"https://localhost:{http}",
            f"https://localhost:{grpc}",
            resource,
            feed_resource,
        )
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def serve_mcp(broker: Broker, resource: str, *extra: str) -> Iterator[str]:
    """The example MCP server at `resource`, with `extra` arguments,
    introspecting or following the feed with its own SVID."""
    cert, key = broker.identity("api-mcp")
    port = urlsplit(resource).port
    assert port is not None
    proc = subprocess.Popen(
        [
            sys.executable,
            str(HERE / "server.py"),
            "--issuer",
            broker.issuer,
            "--resource",
            resource,
            "--ca",
            broker.ca,
            "--cert",
            cert,
            "--key",
            key,
            "--port",
            str(port),
            *extra,
        ]
    )
    try:
        wait_for_port(port, proc, "the MCP server")
        yield resource
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def mcp_server(broker: Broker) -> Iterator[str]:
    """The server checking tokens with PyJWT and introspection."""
    yield from serve_mcp(broker, broker.resource)


@pytest.fixture(scope="session")
def feed_server(broker: Broker) -> Iterator[str]:
    """The server checking tokens with the SDK's Verifier and the feed."""
    yield from serve_mcp(broker, broker.feed_resource, "--feed", broker.grpc_url)


@pytest.fixture
def task(broker: Broker) -> str:
    """A fresh task of the dev agent for the MCP server, read-only."""
    out = broker.cli(
        "--json",
        "task",
        "start",
        "--intent",
        "summarise ticket 42",
        "--audience",
        broker.resource,
        "--scope",
        "read:tickets",
    )
    task_id: str = json.loads(out)["task_id"]
    return task_id
