"""Fixtures: a real broker from this repository's `mayfly` binary (a fresh
`mayfly dev init` profile on free ports, run as its own process), the
identities the tests play (the dev agent, a second agent, a service that
follows the revocation feed), and the CLI for the operator's part."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
TD = "example.org"
AGENT = f"spiffe://{TD}/agent/demo"
OTHER_AGENT = f"spiffe://{TD}/agent/bob"
SERVICE = f"spiffe://{TD}/api/tickets"
API = "https://api.example.com"
TOOLS = "https://tools.example.com"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def mayfly_bin() -> str:
    path = os.environ.get("MAYFLY_BIN") or str(REPO / "target" / "debug" / "mayfly")
    if not Path(path).exists():
        pytest.fail(f"no mayfly binary at {path}: `cargo build -p mayfly-cli`, or set MAYFLY_BIN")
    return path


@dataclass
class Broker:
    """A running broker process and its dev profile."""

    profile: Path
    issuer: str
    grpc_url: str
    proc: subprocess.Popen[bytes] | None
    config: Path
    # An audience policy lets the dev agents read, for the MCP example.
    mcp_resource: str

    @property
    def ca(self) -> Path:
        return self.profile / "bundle.pem"

    def cli(self, *args: str) -> str:
        """`mayfly --profile … ARGS` (the operator's commands), its output."""
        done = subprocess.run(
            [mayfly_bin(), "--profile", str(self.profile), *args],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    def cli_json(self, *args: str) -> Any:  # noqa: ANN401 - the CLI's JSON
        return json.loads(self.cli("--json", *args))

    def start(self) -> None:
        """Serves (again) with the same configuration and data."""
        with (self.profile / "broker.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [mayfly_bin(), "serve", "--config", str(self.config)], stdout=log, stderr=log
            )
        port = int(self.issuer.rsplit(":", 1)[1])
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                pytest.fail(f"the broker exited with {self.proc.returncode}: see its broker.log")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("the broker did not listen")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        # CI searches every test broker's audit trail for secrets.
        trail = self.profile / "data" / "audit.jsonl"
        if (keep := os.environ.get("MAYFLY_TEST_AUDIT_DIR")) and trail.exists():
            shutil.copy(trail, Path(keep) / f"python-sdk-{uuid.uuid4().hex}.jsonl")


def start_broker(
    root: Path, *, heartbeat: str = "5s", extra: str = "", policies: str = ""
) -> Broker:
    profile = root / ".mayfly-dev"
    subprocess.run([mayfly_bin(), "dev", "init", "--dir", str(profile)], check=True)
    for identity in (OTHER_AGENT, SERVICE):
        subprocess.run(
            [mayfly_bin(), "dev", "identity", "--dir", str(profile), identity],
            check=True,
            capture_output=True,
        )
    grpc, http = free_port(), free_port()
    config = profile / "mayfly.toml"
    text = (
        config.read_text()
        .replace("127.0.0.1:8710", f"127.0.0.1:{grpc}")
        .replace("127.0.0.1:8711", f"127.0.0.1:{http}")
        .replace("localhost:8711", f"localhost:{http}")
    )
    text += f'\n[feed]\nheartbeat = "{heartbeat}"\n{extra}'
    config.write_text(text)
    # The example MCP server's URL is an audience the dev agents may read.
    mcp_resource = f"http://127.0.0.1:{free_port()}/mcp"
    (profile / "policies" / "mcp.cedar").write_text(
        f"""
@id("mcp-tickets")
permit (
  principal in Mayfly::Path::"spiffe://{TD}/agent",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource == Mayfly::Audience::"{mcp_resource}"
)
when {{ ["read"].containsAll(context.scope_prefixes) }};
"""
    )
    if policies:
        (profile / "policies" / "extra.cedar").write_text(policies)
    prof = profile / "profile.toml"
    prof.write_text(prof.read_text().replace("localhost:8710", f"localhost:{grpc}"))
    b = Broker(
        profile,
        f"https://localhost:{http}",
        f"https://localhost:{grpc}",
        None,
        config,
        mcp_resource,
    )
    b.start()
    return b


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = start_broker(tmp_path_factory.mktemp("broker"), heartbeat="200ms")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def own_broker(tmp_path: Path) -> Iterator[Broker]:
    """A broker of the test's own, for tests that stop it."""
    b = start_broker(tmp_path, heartbeat="200ms")
    try:
        yield b
    finally:
        b.stop()


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail("redis-server is not installed")
    port = free_port()
    proc = subprocess.Popen(
        [server, "--port", str(port), "--save", "", "--appendonly", "no", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            assert time.monotonic() < deadline, "redis-server did not listen"
            time.sleep(0.05)
    try:
        yield f"redis://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def serve(config: Path, http: int) -> subprocess.Popen[bytes]:
    """`mayfly serve --config CONFIG`, once it listens on `http`."""
    log = (config.parent / f"broker-{http}.log").open("wb")
    proc = subprocess.Popen(
        [mayfly_bin(), "serve", "--config", str(config)], stdout=log, stderr=log
    )
    deadline = time.monotonic() + 30
    while True:
        assert proc.poll() is None, f"the broker exited: see {log.name}"
        try:
            with socket.create_connection(("127.0.0.1", http), timeout=0.2):
                return proc
        except OSError:
            assert time.monotonic() < deadline, "the broker did not listen"
            time.sleep(0.1)


@dataclass
class Replicas:
    """Two brokers of one dev profile on one Redis, behind one issuer (the
    first's), as behind a load balancer."""

    profile: Path
    grpc: list[int]
    http: list[int]
    configs: list[Path]
    procs: list[subprocess.Popen[bytes]]

    @property
    def issuer(self) -> str:
        return f"https://localhost:{self.http[0]}"

    @property
    def ca(self) -> Path:
        return self.profile / "bundle.pem"

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
            p.wait(timeout=10)


def start_replicas(
    root: Path, redis_url: str, edit: Callable[[str], str] = lambda text: text
) -> Replicas:
    """A fresh dev profile whose configuration, changed by `edit`, two
    replicas on `redis_url` serve on free ports."""
    profile = root / ".mayfly-dev"
    subprocess.run([mayfly_bin(), "dev", "init", "--dir", str(profile)], check=True)
    grpc, http = [free_port(), free_port()], [free_port(), free_port()]
    base = (profile / "mayfly.toml").read_text()
    base = base.replace('store = "embedded"', f'store = "{redis_url}"')
    base = edit(base.replace("localhost:8711", f"localhost:{http[0]}"))
    assert redis_url in base, "the dev config changed shape"
    configs = []
    for i in range(2):
        path = profile / f"replica-{i}.toml"
        path.write_text(
            base.replace("127.0.0.1:8710", f"127.0.0.1:{grpc[i]}").replace(
                "127.0.0.1:8711", f"127.0.0.1:{http[i]}"
            )
        )
        configs.append(path)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(2):
            procs.append(serve(configs[i], http[i]))
    except BaseException:
        for p in procs:
            p.terminate()
        raise
    return Replicas(profile, grpc, http, configs, procs)
