"""The broker as an OpenID Shared Signals transmitter, checked by receivers
written here from the specs (SSF 1.0, CAEP 1.0, RFC 8935 push, RFC 8936
poll) with nothing but PyJWT and an HTTP client: each SET is verified
against the broker's JWKS, and each revocation arrives once, also after
the receiver was down for a while and after the broker restarted."""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import mayfly
from tests.conftest import (
    AGENT,
    API,
    OTHER_AGENT,
    SERVICE,
    Broker,
    free_port,
    mayfly_bin,
    start_broker,
    start_replicas,
)

SESSION_REVOKED = "https://schemas.openid.net/secevent/caep/event-type/session-revoked"
CREDENTIAL_CHANGE = "https://schemas.openid.net/secevent/caep/event-type/credential-change"
VERIFICATION = "https://schemas.openid.net/secevent/ssf/event-type/verification"
PUSH = "urn:ietf:rfc:8935"
POLL = "urn:ietf:rfc:8936"


def identity(b: Broker, spiffe_id: str) -> tuple[str, str]:
    name = spiffe_id.rsplit("/", 2)
    d = b.profile / "identities" / f"{name[-2]}-{name[-1]}"
    return (str(d / "svid.pem"), str(d / "svid.key"))


def client(b: Broker, spiffe_id: str | None) -> httpx.Client:
    """An HTTPS client of the broker's side port, presenting the SVID of
    `spiffe_id` (none: anonymous)."""
    ctx = ssl.create_default_context(cafile=str(b.ca))
    if spiffe_id is not None:
        ctx.load_cert_chain(*identity(b, spiffe_id))
    return httpx.Client(base_url=b.issuer, verify=ctx, timeout=30)


class SetChecker:
    """Verifies SETs as a receiver must (RFC 8417, SSF §4): the broker's
    JWKS, `typ` secevent+jwt, `iss`, our own `aud`."""

    def __init__(self, b: Broker, receiver: str) -> None:
        self.issuer = b.issuer
        self.receiver = receiver
        self.jwks = jwt.PyJWKClient(
            f"{b.issuer}/.well-known/jwks.json",
            ssl_context=ssl.create_default_context(cafile=str(b.ca)),
        )

    def check(self, token: str) -> dict[str, Any]:
        assert jwt.get_unverified_header(token)["typ"] == "secevent+jwt"
        key = self.jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token,
            key.key,
            algorithms=["ES256", "EdDSA"],
            audience=self.receiver,
            issuer=self.issuer,
            options={"require": ["iat", "jti"]},
        )
        assert "sub" not in claims
        assert "exp" not in claims
        return claims


@pytest.fixture
def ssf_broker(tmp_path: Path) -> Iterator[Broker]:
    b = start_broker(tmp_path, heartbeat="200ms")
    try:
        yield b
    finally:
        b.stop()


def agent_task(b: Broker) -> tuple[mayfly.Broker, mayfly.Task]:
    agent = mayfly.Broker(mayfly.config.resolve(profile=b.profile))
    return agent, agent.start_task("signals", audiences=[API], scopes=["read:t"])


def fresh_token(task: mayfly.Task) -> mayfly.Token:
    token = task.token(API, ["read:t"], bind=False, ttl=120)
    task.forget(token.lease_id)
    return token


def test_a_poll_receiver_gets_each_revocation_as_a_verified_set(ssf_broker: Broker) -> None:
    b = ssf_broker
    anonymous, receiver, other = client(b, None), client(b, SERVICE), client(b, OTHER_AGENT)
    meta = anonymous.get("/.well-known/ssf-configuration").json()
    assert meta["spec_version"] == "1_0"
    assert meta["issuer"] == b.issuer
    assert set(meta["delivery_methods_supported"]) == {PUSH, POLL}
    streams = meta["configuration_endpoint"]

    # Hostile: no credentials, another's stream, a malformed body.
    refused = anonymous.post(streams, json={"delivery": {"method": POLL}})
    assert refused.status_code == 401
    assert refused.headers["www-authenticate"].startswith("Bearer")
    assert receiver.post(streams, content=b"{not json").status_code == 400
    bad = receiver.post(streams, json={"delivery": {"method": PUSH, "endpoint_url": "http://x"}})
    assert bad.status_code == 400
    assert "https" in bad.json()["description"]

    made = receiver.post(
        streams,
        json={"delivery": {"method": POLL}, "events_requested": [SESSION_REVOKED]},
    )
    assert made.status_code == 201, made.text
    config = made.json()
    sid, poll_url = config["stream_id"], config["delivery"]["endpoint_url"]
    assert config["aud"] == SERVICE
    assert config["events_delivered"] == [SESSION_REVOKED]
    assert other.get(streams, params={"stream_id": sid}).status_code == 403
    assert other.post(poll_url, json={"returnImmediately": True}).status_code == 403
    assert anonymous.post(poll_url, json={}).status_code == 401
    subject = {"format": "uri", "uri": AGENT}
    added = receiver.post(meta["add_subject_endpoint"], json={"stream_id": sid, "subject": subject})
    assert added.status_code == 200, added.text

    agent, task = agent_task(b)
    tokens = [fresh_token(task) for _ in range(3)]
    b.cli("lease", "revoke", tokens[0].lease_id, "--reason", "signals test")
    task.complete()
    checker = SetChecker(b, SERVICE)
    got: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 10
    while len(got) < 3:
        assert time.monotonic() < deadline, f"only {len(got)} SETs arrived"
        answer = receiver.post(poll_url, json={"ack": list(got), "returnImmediately": True})
        assert answer.status_code == 200, answer.text
        for jti, token in answer.json()["sets"].items():
            claims = checker.check(token)
            assert claims["jti"] == jti
            got[jti] = claims
    # A SET is no access token: a validator refuses it for its typ.
    some_set = receiver.post(poll_url, json={"returnImmediately": True}).json()["sets"]
    assert some_set, "the unacknowledged SETs come again"
    with mayfly.Verifier(issuer=b.issuer, audience=SERVICE, ca=b.ca) as verifier:
        for token in some_set.values():
            with pytest.raises(mayfly.VerifyError) as not_a_token:
                verifier.verify(token)
            assert not_a_token.value.check == "wrong_type"
    leases = {c["sub_id"]["session"]["id"] for c in got.values()}
    assert leases == {t.lease_id for t in tokens}
    for c in got.values():
        assert c["sub_id"]["format"] == "complex"
        assert c["sub_id"]["user"] == {"format": "uri", "uri": AGENT}
        assert c["sub_id"]["task"]["id"] == task.task_id
        assert list(c["events"]) == [SESSION_REVOKED]
    # Acknowledged: nothing more, and nothing twice.
    last = receiver.post(poll_url, json={"ack": list(got), "returnImmediately": True}).json()
    assert last["sets"] == {}
    assert last["moreAvailable"] is False

    # Verification (SSF §8.1.4): a SET carrying our state.
    verified = receiver.post(meta["verification_endpoint"], json={"stream_id": sid, "state": "s-1"})
    assert verified.status_code == 204
    sets = receiver.post(poll_url, json={"returnImmediately": True}).json()["sets"]
    (claims,) = [checker.check(t) for t in sets.values()]
    assert claims["events"][VERIFICATION] == {"state": "s-1"}
    assert claims["sub_id"] == {"format": "opaque", "id": sid}

    # Another receiver cannot delete it; its owner can.
    assert other.delete(streams, params={"stream_id": sid}).status_code == 403
    assert receiver.delete(streams, params={"stream_id": sid}).status_code == 204
    assert receiver.get(streams, params={"stream_id": sid}).status_code == 404
    agent.close()


class PushReceiver:
    """An RFC 8935 endpoint on a loopback port: 202 for each SET, recorded
    with the Authorization header it came with; stopped and started at
    will, on the same port."""

    def __init__(self, checker: SetChecker) -> None:
        self.checker = checker
        self.port = free_port()
        self.sets: list[dict[str, Any]] = []
        self.auth: set[str] = set()
        self.lock = threading.Lock()
        self.server: ThreadingHTTPServer | None = None

    def start(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"])).decode()
                assert self.headers["Content-Type"] == "application/secevent+jwt"
                claims = outer.checker.check(body)
                with outer.lock:
                    outer.sets.append(claims)
                    outer.auth.add(self.headers.get("Authorization", ""))
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def leases(self) -> list[str]:
        with self.lock:
            return [c["sub_id"]["session"]["id"] for c in self.sets if "session" in c["sub_id"]]

    def wait_for(self, n: int, timeout: float) -> float:
        start = time.monotonic()
        while len(self.leases()) < n:
            assert time.monotonic() - start < timeout, f"{len(self.leases())} of {n} SETs"
            time.sleep(0.01)
        return time.monotonic() - start


def hanging_endpoint() -> tuple[socket.socket, int]:
    """A port that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(64)
    return s, s.getsockname()[1]


def test_a_push_receiver_misses_nothing_and_gets_nothing_twice(ssf_broker: Broker) -> None:
    b = ssf_broker
    receiver = client(b, SERVICE)
    checker = SetChecker(b, SERVICE)
    push = PushReceiver(checker)
    push.start()
    meta = receiver.get("/.well-known/ssf-configuration").json()

    def stream(url: str, auth: str) -> str:
        made = receiver.post(
            meta["configuration_endpoint"],
            json={
                "delivery": {"method": PUSH, "endpoint_url": url, "authorization_header": auth},
                "events_requested": [SESSION_REVOKED, CREDENTIAL_CHANGE],
            },
        )
        assert made.status_code == 201, made.text
        assert "authorization_header" not in made.json()["delivery"]
        sid: str = made.json()["stream_id"]
        subject = {"format": "uri", "uri": API}
        r = receiver.post(meta["add_subject_endpoint"], json={"stream_id": sid, "subject": subject})
        assert r.status_code == 200
        return sid

    # A receiver that never answers has a stream too, made first: each of
    # its attempts waits 5 s for an answer, and must hold up nothing else.
    hang, hang_port = hanging_endpoint()
    stream(f"http://127.0.0.1:{hang_port}/events", "Bearer other")
    stream(f"http://127.0.0.1:{push.port}/events", "Bearer receiver-secret")

    agent, task = agent_task(b)
    tokens = [fresh_token(task) for _ in range(6)]

    def revoke(t: mayfly.Token) -> float:
        start = time.monotonic()
        b.cli("lease", "revoke", t.lease_id)
        return time.monotonic() - start

    # Live: the revocation and its SET take less than one of the hanging
    # stream's attempts.
    assert revoke(tokens[0]) < 4
    assert push.wait_for(1, 10) < 4
    assert push.auth == {"Bearer receiver-secret"}

    # The receiver is down while two are revoked; back, it gets both.
    push.stop()
    revoke(tokens[1])
    revoke(tokens[2])
    time.sleep(2)
    push.start()
    push.wait_for(3, 40)

    # The broker restarts mid-stream: it resumes where it stood.
    b.stop()
    b.start()
    revoke(tokens[3])
    push.wait_for(4, 40)
    task.complete()
    push.wait_for(6, 40)
    time.sleep(1)
    leases = push.leases()
    assert sorted(leases) == sorted(t.lease_id for t in tokens), "missed or sent twice"
    assert len({c["jti"] for c in push.sets}) == len(push.sets)
    push.stop()
    hang.close()
    agent.close()


RECEIVER_POLICY = f"""
@id("ssf-receiver")
permit (
  principal == Mayfly::Agent::"{SERVICE}",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource
);
"""


def test_a_receiver_may_use_a_token_of_the_broker(tmp_path: Path) -> None:
    b = start_broker(tmp_path, policies=RECEIVER_POLICY)
    try:
        anonymous = client(b, None)
        streams = anonymous.get("/.well-known/ssf-configuration").json()["configuration_endpoint"]

        def status(token: str) -> int:
            r = anonymous.get(streams, headers={"Authorization": f"Bearer {token}"})
            return r.status_code

        # Not a token of this broker: refused.
        assert status("not-a-jwt") == 401
        assert status(jwt.encode({"aud": f"{b.issuer}/ssf"}, "k" * 32, algorithm="HS256")) == 401
        # The receiver's own token for the transmitter's audience: accepted.
        svc = mayfly.Broker(mayfly.config.resolve(profile=b.profile, identity="api-tickets"))
        audience = f"{b.issuer}/ssf"
        task = svc.start_task("receive signals", audiences=[audience, API], scopes=["read"])
        token = task.token(audience, ["read"], bind=False)
        assert status(token.value) == 200
        # Another audience's token, or one revoked, is not.
        assert status(task.token(API, ["read"], bind=False).value) == 401
        b.cli("lease", "revoke", token.lease_id)
        assert status(token.value) == 401
        svc.close()
    finally:
        b.stop()


def test_two_replicas_push_each_set_once(tmp_path: Path, redis_url: str) -> None:
    """Two brokers on one Redis both run push delivery: one leads the
    stream at a time, and the receiver gets every revocation once,
    whichever replica it went through."""
    replicas = start_replicas(tmp_path, redis_url)
    profile, grpc, http = replicas.profile, replicas.grpc, replicas.http
    subprocess.run(
        [mayfly_bin(), "dev", "identity", "--dir", str(profile), SERVICE],
        check=True,
        capture_output=True,
    )
    try:
        b = Broker(
            profile,
            f"https://localhost:{http[0]}",
            f"https://localhost:{grpc[0]}",
            None,
            profile / "replica-0.toml",
            "",
        )
        receiver = client(b, SERVICE)
        push = PushReceiver(SetChecker(b, SERVICE))
        push.start()
        made = receiver.post(
            "/ssf/streams",
            json={
                "delivery": {"method": PUSH, "endpoint_url": f"http://127.0.0.1:{push.port}/e"},
                "events_requested": [SESSION_REVOKED],
            },
        )
        assert made.status_code == 201, made.text
        sid = made.json()["stream_id"]
        subject = {"format": "uri", "uri": AGENT}
        assert (
            receiver.post(
                "/ssf/subjects:add", json={"stream_id": sid, "subject": subject}
            ).status_code
            == 200
        )
        agents = [
            mayfly.Broker(
                mayfly.config.resolve(
                    f"https://localhost:{g}",
                    ca=profile / "bundle.pem",
                    cert=profile / "identities" / "agent-demo" / "svid.pem",
                    key=profile / "identities" / "agent-demo" / "svid.key",
                )
            )
            for g in grpc
        ]
        tokens = []
        for i in range(8):
            task = agents[i % 2].start_task("replicas", audiences=[API], scopes=["read:t"])
            tokens.append(fresh_token(task))
            task.complete()
        push.wait_for(8, 60)
        time.sleep(2)
        assert sorted(push.leases()) == sorted(t.lease_id for t in tokens), "missed or twice"
        push.stop()
        for a in agents:
            a.close()
    finally:
        replicas.stop()
