"""Database logins from the task block, against a real `redis-server` (the
Redis engine: an ACL user per login) and checked with the stock
`redis-cli`: the login reads what its scope grants and nothing else, its
secrets stay out of its repr, a scope outside the envelope is refused with
a typed error, and leaving the block drops the login."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

import mayfly
from tests.conftest import start_broker

CACHE = "redis://cache"

DATABASE = """
[[databases]]
name = "{name}"
url = "{url}"
[databases.scopes]
"cache:read" = ["%R~orders:*", "+@read", "+@connection"]
"cache:write" = ["%RW~orders:*", "+@write", "+@connection"]
"""

POLICIES = f"""
@id("cache-tasks")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"start_task",
        resource == Mayfly::Audience::"{CACHE}");

@id("cache-logins")
permit (principal in Mayfly::Path::"spiffe://example.org/agent",
        action == Mayfly::Action::"issue_database_login",
        resource == Mayfly::Audience::"{CACHE}");
"""


def redis_cli(url: str, *command: str) -> subprocess.CompletedProcess[str]:
    """`redis-cli` as the user and password in `url`. A refused login shows
    as "AUTH failed" on stderr (redis-cli then goes on as the default
    user, so the exit code alone says nothing)."""
    cli = shutil.which("redis-cli")
    if cli is None:
        pytest.fail("redis-cli is not installed")
    parts = urlsplit(url)
    return subprocess.run(
        [
            cli,
            "-h",
            parts.hostname or "",
            "-p",
            str(parts.port),
            "--user",
            parts.username or "",
            "--pass",
            parts.password or "",
            "--no-auth-warning",
            *command,
        ],
        capture_output=True,
        text=True,
        check=False,
    )


def test_a_database_login_lives_and_dies_with_its_task(tmp_path: Path, redis_url: str) -> None:
    subprocess.run(
        ["redis-cli", "-u", redis_url, "SET", "orders:1", "50"], check=True, capture_output=True
    )
    broker = start_broker(
        tmp_path, extra=DATABASE.format(name=CACHE, url=redis_url), policies=POLICIES
    )
    try:
        with (
            mayfly.connect(profile=broker.profile) as b,
            b.task("warm the cache", audiences=[CACHE], scopes=["cache:read"]) as t,
        ):
            login = t.database_login(CACHE, ["cache:read"])
            assert login.database == CACHE
            assert login.user.startswith("mayfly_")
            assert login.password not in repr(login)
            assert login.dsn.startswith("redis://")
            assert login.dsn not in repr(login)
            assert login.seconds_left() > 0

            got = redis_cli(login.dsn, "GET", "orders:1")
            assert "AUTH failed" not in got.stderr, got.stderr
            assert got.stdout.strip() == "50"
            written = redis_cli(login.dsn, "SET", "orders:1", "0")
            assert "NOPERM" in written.stdout + written.stderr

            # In the database's scopes, outside the task's envelope.
            with pytest.raises(mayfly.OutsideEnvelope, match="cache:write"):
                t.database_login(CACHE, ["cache:write"])
            with pytest.raises(mayfly.NotFound, match="not configured"):
                t.database_login("redis://sessions", ["cache:read"])

        # Leaving the block completed the task: the login is dropped.
        deadline = time.monotonic() + 10
        while "AUTH failed" not in redis_cli(login.dsn, "PING").stderr:
            assert time.monotonic() < deadline, "the login still worked after the task"
            time.sleep(0.05)
        leases = broker.cli_json("lease", "list", "--task", t.task_id)
        states = {lease["lease_id"]: lease["state"] for lease in leases}
        assert states[login.lease_id] == "revoked"
    finally:
        broker.stop()
