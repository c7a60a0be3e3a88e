"""Fixtures: a real broker from this repository's `mayfly` binary (a fresh
`mayfly dev init` profile on free ports, with the example tool policies of
deploy/policies), the billing MCP server, an HTTP API that demands an API
key, and `mayfly gateway` in front of both, each a process of its own but
the API (a thread here, so the test sees every request it gets)."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest

HERE = Path(__file__).resolve().parent.parent
REPO = HERE.parent.parent
TRUST_DOMAIN = "example.org"
AGENT = f"spiffe://{TRUST_DOMAIN}/agent/demo"
GATEWAY_ID = f"spiffe://{TRUST_DOMAIN}/gateway/billing"
#: The key only the gateway holds.
API_KEY = "sk-live-7d3e9a41c0b2"


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
class Request:
    """A request the API got."""

    path: str
    headers: dict[str, str]
    body: str


@dataclass
class KeyApi:
    """An HTTP API that serves only requests carrying its key, and
    remembers every request it got."""

    port: int
    seen: list[Request] = field(default_factory=list)


def serve_key_api() -> tuple[KeyApi, ThreadingHTTPServer]:
    api = KeyApi(free_port())

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("content-length", "0")))
            headers = {k.lower(): v for k, v in self.headers.items()}
            api.seen.append(Request(self.path, headers, body.decode()))
            ok = self.headers.get("x-api-key") == API_KEY
            answer = json.dumps({"paid": ok, "path": self.path}).encode()
            self.send_response(200 if ok else 401)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", api.port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return api, server


@dataclass
class Stack:
    """The broker, the gateway and what it fronts."""

    profile: Path
    issuer: str
    gateway: str
    billing: str  # the MCP endpoint on the gateway: its tokens' audience
    payments: str  # the API's prefix on the gateway: its tokens' audience
    billing_log: Path
    api: KeyApi

    def tls(self) -> ssl.SSLContext:
        """Trusts the dev CA and presents the agent's SVID."""
        ctx = ssl.create_default_context(cafile=str(self.profile / "bundle.pem"))
        d = self.profile / "identities" / "agent-demo"
        ctx.load_cert_chain(str(d / "svid.pem"), str(d / "svid.key"))
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

    def billing_calls(self) -> list[dict[str, object]]:
        """What reached the billing server."""
        if not self.billing_log.exists():
            return []
        return [json.loads(line) for line in self.billing_log.read_text().splitlines()]

    def task(self, intent: str) -> str:
        out = self.cli(
            "--json",
            "task",
            "start",
            "--intent",
            intent,
            "--audience",
            self.billing,
            "--audience",
            self.payments,
        )
        task_id: str = json.loads(out)["task_id"]
        return task_id

    def token(self, task: str, audience: str) -> str:
        """A bearer token of `task` for `audience`, as a stock OAuth client
        gets one (the agent's mTLS identity, client_credentials)."""
        r = httpx.post(
            f"{self.issuer}/oauth2/token",
            data={
                "grant_type": "client_credentials",
                "task_id": task,
                "resource": audience,
                "token_binding": "none",
            },
            verify=self.tls(),
        )
        assert r.status_code == 200, r.text
        access: str = r.json()["access_token"]
        return access


def tool_policies(profile: Path, audiences: list[str]) -> None:
    """The example tool policies of deploy/policies for the dev agents, a
    payments API beside them, and the tasks that may use both."""
    policies = profile / "policies"
    example = REPO / "deploy" / "policies"
    (policies / "tools.toml").write_text(
        (example / "tools.toml").read_text()
        + '\n[payments.pay]\nid = "string"\namount = "decimal"\n'
    )
    agents = f"spiffe://{TRUST_DOMAIN}/agent"
    (policies / "tools.cedar").write_text(
        (example / "tools.cedar").read_text().replace("spiffe://prod.example.com/agents", agents)
        + f"""
@id("payments-small")
permit (principal in Mayfly::Path::"{agents}",
        action == Mayfly::Action::"payments/pay", resource)
when {{ context.arguments.amount.lessThanOrEqual(decimal("100.0")) }};
"""
    )
    (policies / "gateway-tasks.cedar").write_text(
        "".join(
            f"""
@id("gateway-tasks-{i}")
permit (
  principal in Mayfly::Path::"{agents}",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource == Mayfly::Audience::"{aud}"
);
"""
            for i, aud in enumerate(audiences)
        )
    )


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    base = tmp_path_factory.mktemp("stack")
    profile = base / ".mayfly-dev"
    subprocess.run([mayfly_bin(), "dev", "init", "--dir", str(profile)], check=True)
    subprocess.run([mayfly_bin(), "dev", "identity", "--dir", str(profile), GATEWAY_ID], check=True)
    grpc, http, gw, billing_port = free_port(), free_port(), free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw}"
    billing, payments = f"{gateway}/billing/mcp", f"{gateway}/payments"
    config = profile / "mayfly.toml"
    text = (
        config.read_text()
        .replace("127.0.0.1:8710", f"127.0.0.1:{grpc}")
        .replace("127.0.0.1:8711", f"127.0.0.1:{http}")
        .replace("localhost:8711", f"localhost:{http}")
    )
    # This stack's gateway in place of the dev one (an upstream has one
    # audience across gateways).
    dev_gateway = f'[[gateways]]\nid = "spiffe://{TRUST_DOMAIN}/gateway/dev"\n'
    assert dev_gateway in text
    text = text.replace(dev_gateway, "# (the dev gateway is not used here)\n", 1)
    text = text.replace('upstreams = { billing = "https://tools.example.com" }\n', "", 1)
    text += (
        f'\n[[gateways]]\nid = "{GATEWAY_ID}"\n'
        f'upstreams = {{ billing = "{billing}", payments = "{payments}" }}\n'
    )
    config.write_text(text)
    (profile / "profile.toml").write_text(
        (profile / "profile.toml").read_text().replace("localhost:8710", f"localhost:{grpc}")
    )
    tool_policies(profile, [billing, payments])

    api, api_server = serve_key_api()
    (base / "api.key").write_text(API_KEY + "\n")
    (base / "api.key").chmod(0o600)
    ident = profile / "identities" / "gateway-billing"
    (base / "gateway.toml").write_text(
        f"""
approval_wait = "20s"

[listen]
addr = "127.0.0.1:{gw}"

[broker]
url = "https://localhost:{grpc}"
issuer = "https://localhost:{http}"
ca = "{profile / "bundle.pem"}"
cert = "{ident / "svid.pem"}"
key = "{ident / "svid.key"}"

[[upstreams]]
name = "billing"
protocol = "mcp"
path = "/billing/mcp"
audience = "{billing}"
url = "http://127.0.0.1:{billing_port}/mcp"

[[upstreams]]
name = "payments"
protocol = "http"
path = "/payments"
audience = "{payments}"
url = "http://127.0.0.1:{api.port}"
credential = {{ kind = "header", name = "X-Api-Key", file = "api.key" }}

[[upstreams.routes]]
method = "POST"
path = "/v1/payments/{{id}}"
tool = "pay"
"""
    )
    billing_log = base / "billing.jsonl"
    logs = (base / "processes.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        broker = subprocess.Popen(
            [mayfly_bin(), "serve", "--config", str(config)], stdout=logs, stderr=logs
        )
        procs.append(broker)
        wait_for_port(http, broker, "the broker")
        server = subprocess.Popen(
            [
                sys.executable,
                str(HERE / "billing.py"),
                "--port",
                str(billing_port),
                "--log",
                str(billing_log),
            ],
            stdout=logs,
            stderr=logs,
        )
        procs.append(server)
        wait_for_port(billing_port, server, "the billing server")
        gateway_proc = subprocess.Popen(
            [mayfly_bin(), "gateway", "--config", str(base / "gateway.toml")],
            stdout=logs,
            stderr=logs,
        )
        procs.append(gateway_proc)
        wait_for_port(gw, gateway_proc, "the gateway")
        yield Stack(
            profile, f"https://localhost:{http}", gateway, billing, payments, billing_log, api
        )
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(timeout=10)
        api_server.shutdown()
        logs.close()
