"""The agent side against a real broker: tasks that complete on leaving
their block (also on an exception), the token cache, typed refusals, an
approval round trip through an operator, certificates from a local key,
context changes, delegation, and httpx requests authorised per audience."""

from __future__ import annotations

import asyncio
import subprocess
import threading
import time
from pathlib import Path

import httpx
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

import mayfly
from tests.conftest import API, OTHER_AGENT, TOOLS, Broker, free_port, start_broker


def connect(broker: Broker, identity: str | None = None) -> mayfly.Connector:
    return mayfly.connect(profile=broker.profile, identity=identity)


def lease_states(broker: Broker, task_id: str) -> dict[str, str]:
    leases = broker.cli_json("lease", "list", "--task", task_id)
    return {str(lease["lease_id"]): str(lease["state"]) for lease in leases}


def test_the_task_block_completes_the_task_and_revokes_its_leases(broker: Broker) -> None:
    async def run() -> tuple[str, str]:
        async with connect(broker) as b:
            async with b.task("summarise ticket 42", audiences=[API], scopes=["read:tickets"]) as t:
                token = await t.token(API, ["read:tickets"])
                assert lease_states(broker, t.task_id)[token.lease_id] == "active"
            assert t.info.state == "completed"
            return t.task_id, token.lease_id

    task_id, lease = asyncio.run(run())
    states = lease_states(broker, task_id)
    assert states[lease] == "revoked"
    assert states[task_id] == "revoked"


def test_the_task_block_completes_the_task_on_an_exception(broker: Broker) -> None:
    seen: dict[str, str] = {}

    def crash() -> None:
        with (
            connect(broker) as b,
            b.task("summarise ticket 43", audiences=[API], scopes=["read:tickets"]) as t,
        ):
            seen["task"] = t.task_id
            seen["lease"] = t.token(API, ["read:tickets"]).lease_id
            raise RuntimeError("tool crashed")

    with pytest.raises(RuntimeError, match="tool crashed"):
        crash()
    states = lease_states(broker, seen["task"])
    assert states[seen["lease"]] == "revoked"
    assert states[seen["task"]] == "revoked"
    # The task is over: nothing more is issued under it.
    with connect(broker) as b:
        t = b.attach(seen["task"])
        assert t.info.state == "completed"
        with pytest.raises(mayfly.TaskEnded):
            t.token(API, ["read:tickets"])


def test_tokens_are_cached_per_audience_and_scopes_and_bound_by_default(broker: Broker) -> None:
    with connect(broker) as b, b.task("read", audiences=[API, TOOLS], scopes=["read:x"]) as t:
        first = t.token(API, ["read:x"])
        assert t.token(API, ["read:x"]) is first
        other = t.token(TOOLS, ["read:x"])
        assert other.lease_id != first.lease_id
        unbound = t.token(API, ["read:x"], bind=False)
        assert unbound.lease_id != first.lease_id
        claims = jwt.decode(first.value, options={"verify_signature": False})
        assert claims["aud"] == API
        assert "x5t#S256" in claims["cnf"]
        assert "cnf" not in jwt.decode(unbound.value, options={"verify_signature": False})
        t.forget(first.lease_id)
        assert t.token(API, ["read:x"]).lease_id != first.lease_id
        # The value never shows in a repr.
        assert first.value not in repr(first)


def test_a_token_near_its_expiry_is_renewed(broker: Broker) -> None:
    with connect(broker) as b, b.task("read", audiences=[API], scopes=["read:x"]) as t:
        # 5 s of life: renewed once less than a fifth (1 s) is left.
        short = t.token(API, ["read:x"], ttl=5)
        assert t.token(API, ["read:x"]) is short
        time.sleep(max(0.0, short.seconds_left() - 0.9))
        renewed = t.token(API, ["read:x"])
        assert renewed.lease_id != short.lease_id


def test_refusals_are_typed(broker: Broker) -> None:
    with connect(broker) as b:
        with pytest.raises(mayfly.PolicyDenied) as denied:
            b.task(
                "export the customer table",
                audiences=[API],
                scopes=["read:files", "export:files"],
                context={"data_sensitivity": "restricted"},
            ).start()
        assert denied.value.policy_id == "dev-no-export-of-restricted-data"
        assert denied.value.code == "PERMISSION_DENIED"
        with b.task("read", audiences=[API], scopes=["read:x", "export:x"]) as t:
            # No permit covers an export token: the default deny names no policy.
            with pytest.raises(mayfly.PolicyDenied) as default:
                t.token(API, ["export:x"])
            assert default.value.policy_id is None
            with pytest.raises(mayfly.OutsideEnvelope):
                t.token("https://elsewhere.example.com", ["read:x"])
            with pytest.raises(mayfly.OutsideEnvelope):
                t.token(API, ["read:secrets"])
        with pytest.raises(mayfly.NotFound):
            b.attach("AAAAAAAAAAAAAAAAAAAAAA")
        with pytest.raises(mayfly.InvalidRequest):
            b.task("no audience", audiences=[], scopes=[]).start()
        with pytest.raises(TypeError):
            b.task("oops", audiences=API, scopes=[])


def test_an_unknown_identity_or_profile_is_a_config_error(broker: Broker, tmp_path: Path) -> None:
    with pytest.raises(mayfly.ConfigError, match="not found"):
        mayfly.connect(profile=broker.profile, identity="agent-nobody")
    with pytest.raises(mayfly.ConfigError, match="cannot read profile"):
        mayfly.connect(profile=tmp_path)


def test_an_approval_round_trip(broker: Broker) -> None:
    with (
        connect(broker) as b,
        b.task(
            "fix ticket 42",
            audiences=[API],
            scopes=["read:tickets", "write:tickets"],
            context={"environment": "production"},
        ) as t,
    ):
        with pytest.raises(mayfly.ApprovalRequired) as asked:
            t.token(API, ["write:tickets"])
        approval = asked.value.approval
        assert approval.state == "pending"
        assert approval.policy_id == "dev-write-production"
        broker.cli("approval", "approve", approval.approval_id, "--reason", "CHG-1")
        assert b.wait_for_approval(approval.approval_id, timeout=10).state == "approved"
        token = t.token(API, ["write:tickets"], approval_id=approval.approval_id)
        assert token.scopes == ["write:tickets"]

        # With wait_for_approval the SDK waits for the operator itself.
        def operator() -> None:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                listed = broker.cli_json("approval", "list")
                pending = [a for a in listed if a["task_id"] == t.task_id]
                if pending:
                    broker.cli("approval", "approve", str(pending[0]["approval_id"]))
                    return
                time.sleep(0.05)

        helper = threading.Thread(target=operator)
        helper.start()
        waited = t.token(API, ["write:tickets"], bind=False, wait_for_approval=15)
        helper.join()
        assert waited.lease_id != token.lease_id

        # A denial carries the operator's reason.
        with pytest.raises(mayfly.ApprovalRequired) as again:
            t.token(API, ["read:tickets", "write:tickets"])
        broker.cli("approval", "deny", again.value.approval_id, "--reason", "not today")
        with pytest.raises(mayfly.ApprovalDenied) as refused:
            b.wait_for_approval(again.value.approval_id, timeout=10)
        assert refused.value.reason == "not today"


def test_a_certificate_from_a_local_key(broker: Broker, tmp_path: Path) -> None:
    with connect(broker) as b, b.task("tls", audiences=[API], scopes=["read:x"]) as t:
        cert = t.certificate(ttl=120)
        leaf = x509.load_pem_x509_certificate(cert.certificate_pem.encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        assert uris == [f"spiffe://example.org/agent/demo/task/{t.task_id}"]
        assert cert.spiffe_id == uris[0]
        # The certificate is for the key made here.
        der = PublicFormat.SubjectPublicKeyInfo
        assert leaf.public_key().public_bytes(Encoding.DER, der) == (
            cert.private_key.public_key().public_bytes(Encoding.DER, der)
        )
        assert "PRIVATE" not in repr(cert)
        # openssl, not this package, checks the chain to the trust bundle.
        (tmp_path / "leaf.pem").write_text(cert.certificate_pem)
        (tmp_path / "chain.pem").write_text(cert.chain_pem)
        done = subprocess.run(
            [
                "openssl",
                "verify",
                "-CAfile",
                str(broker.ca),
                "-untrusted",
                str(tmp_path / "chain.pem"),
                str(tmp_path / "leaf.pem"),
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        lease = cert.lease_id
    assert lease_states(broker, t.task_id)[lease] == "revoked"


def test_a_context_change_revokes_what_policy_no_longer_allows(broker: Broker) -> None:
    with (
        connect(broker) as b,
        b.task(
            "fix",
            audiences=[API],
            scopes=["read:t", "write:t"],
            context={"environment": "staging"},
        ) as t,
    ):
        write = t.token(API, ["write:t"])
        read = t.token(API, ["read:t"])
        revoked = t.update_context(set={"environment": "production"})
        assert revoked == [write.lease_id]
        assert t.info.context == {"environment": "production"}
        # The revoked token left the cache; the read token stayed.
        assert t.token(API, ["read:t"]) is read
        with pytest.raises(mayfly.ApprovalRequired):
            t.token(API, ["write:t"])


def test_delegation_to_another_agent(broker: Broker) -> None:
    with connect(broker) as b, b.task("triage", audiences=[API, TOOLS], scopes=["read:t"]) as t:
        child = t.delegate(
            OTHER_AGENT, intent="look up ticket 42", audiences=[TOOLS], scopes=["read:t"]
        )
        assert child.parent_task_id == t.task_id
        with pytest.raises(mayfly.OutsideEnvelope):
            t.delegate(OTHER_AGENT, intent="wider", audiences=["https://o.example.com"], scopes=[])
        with connect(broker, "agent-bob") as bob:
            with bob.attach(child.task_id) as sub:
                token = sub.token(TOOLS, ["read:t"])
                claims = jwt.decode(token.value, options={"verify_signature": False})
                assert claims["sub"] == "spiffe://example.org/agent/demo"
                assert claims["act"] == {"sub": OTHER_AGENT}
            # The demo agent cannot use bob's task.
            with pytest.raises(mayfly.NotFound):
                b.attach(child.task_id)


def test_httpx_auth_sends_each_audience_its_own_token(broker: Broker) -> None:
    seen: list[tuple[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        auth = request.headers.get("authorization", "")
        claims = jwt.decode(auth.split(" ", 1)[1], options={"verify_signature": False})
        seen.append((str(request.url), claims["aud"]))
        return httpx.Response(200)

    async def run() -> None:
        async with (
            connect(broker) as b,
            b.task("read", audiences=[API, TOOLS], scopes=["read:t"]) as t,
            httpx.AsyncClient(transport=httpx.MockTransport(handler), auth=t.auth()) as http,
        ):
            await http.get(f"{API}/tickets/42")
            await http.get(f"{TOOLS}/search?q=x")
            # No audience covers this host: no request leaves, no token.
            with pytest.raises(mayfly.NoAudience):
                await http.get("https://api.example.com.evil.test/tickets")

    asyncio.run(run())
    assert seen == [(f"{API}/tickets/42", API), (f"{TOOLS}/search?q=x", TOOLS)]


def test_the_blocking_httpx_auth_retries_once_with_a_fresh_token(broker: Broker) -> None:
    sent: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(request.headers["authorization"])
        if len(sent) == 1:
            # A service that found the token revoked.
            return httpx.Response(401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return httpx.Response(200)

    with (
        connect(broker) as b,
        b.task("read", audiences=[API], scopes=["read:t"]) as t,
        httpx.Client(transport=httpx.MockTransport(handler), auth=t.auth(["read:t"])) as http,
    ):
        assert http.get(f"{API}/tickets").status_code == 200
    assert len(sent) == 2
    assert sent[0] != sent[1]
    assert all(s.startswith("Bearer ") for s in sent)


def test_a_rate_limit_says_when_to_retry(tmp_path: Path) -> None:
    b = start_broker(tmp_path, extra="[rate_limit]\nper_second = 0.5\nburst = 2.0\n")
    try:
        with connect(b) as broker, broker.task("read", audiences=[API], scopes=["read:t"]) as t:
            t.token(API, ["read:t"], bind=False)
            t.token(API, ["read:t"], bind=True)
            with pytest.raises(mayfly.RateLimited) as limited:
                t.token(TOOLS, ["read:t"])
            assert limited.value.retry_after >= 1
            assert limited.value.code == "RESOURCE_EXHAUSTED"
    finally:
        b.stop()


def test_a_broker_that_is_down_is_unavailable(broker: Broker) -> None:
    conn = mayfly.config.resolve(profile=broker.profile)
    down = mayfly.Connection(
        f"https://localhost:{free_port()}", conn.ca_pem, conn.cert_pem, conn.key_pem
    )
    with mayfly.Broker(down) as b, pytest.raises(mayfly.Unavailable) as e:
        b.task("read", audiences=[API], scopes=["read:t"]).start()
    assert e.value.code == "UNAVAILABLE"
