"""The validator side: `mayfly.Verifier` against the real broker's JWKS and
revocation feed, and the RFC 8725 attacks (with tokens forged here, signed
by keys the test makes; claim checks use a verifier given the test's own
JWKS, as a service pinned to a key set would). Making a verifier does no
I/O and starts no thread; `averify` raises as `verify` does."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

import mayfly
from tests.conftest import API, Broker

Claims = dict[str, Any]


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned(header: Claims, claims: Claims) -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"


def feed(broker: Broker, max_silence: float = 15.0) -> mayfly.FeedConfig:
    return mayfly.FeedConfig.from_profile(broker.profile, "api-tickets", max_silence)


def verifier(broker: Broker, *, with_feed: bool = True, silence: float = 15.0) -> mayfly.Verifier:
    v = mayfly.Verifier(
        issuer=broker.issuer,
        audience=API,
        ca=broker.ca,
        feed=feed(broker, silence) if with_feed else None,
    )
    assert v.wait_for_feed(10), "the feed did not sync"
    return v


@pytest.fixture(scope="module")
def live(broker: Broker) -> Iterator[mayfly.Verifier]:
    v = verifier(broker)
    yield v
    v.close()


def refused(v: mayfly.Verifier, token: str, **kw: Any) -> str:  # noqa: ANN401
    with pytest.raises(mayfly.VerifyError) as e:
        v.verify(token, **kw)
    return e.value.check


def until_refused(v: mayfly.Verifier, token: str, within: float = 10) -> mayfly.VerifyError:
    """Verifies `token` until it is refused (the feed delivers within
    milliseconds; the bound only keeps a broken build from hanging)."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            v.verify(token)
        except mayfly.VerifyError as e:
            return e
        time.sleep(0.005)
    pytest.fail(f"still accepted after {within} s")


def agent_cert(broker: Broker, identity: str = "agent-demo") -> str:
    return (broker.profile / "identities" / identity / "svid.pem").read_text()


def test_a_token_verifies_and_a_revoked_one_is_refused(
    broker: Broker, live: mayfly.Verifier
) -> None:
    with mayfly.connect(profile=broker.profile) as b:
        t = b.start_task("read", audiences=[API], scopes=["read:t"])
        token = t.token(API, ["read:t"], bind=False)
        ok = live.verify(token.value)
        assert (ok.agent, ok.task_id, ok.lease_id) == (t.info.agent_id, t.task_id, token.lease_id)
        assert ok.scopes == ["read:t"]
        assert ok.has_scope("read:t")
        assert not ok.has_scope("write:t")
        # Revoked by completing the task: the feed tells the verifier.
        t.complete()
        assert until_refused(live, token.value).check == "revoked"


def test_a_bound_token_needs_its_certificate(broker: Broker, live: mayfly.Verifier) -> None:
    with mayfly.connect(profile=broker.profile) as b, b.task("r", audiences=[API]) as t:
        token = t.token(API)
        assert live.verify(token.value, client_cert=agent_cert(broker)).bound_to
        assert refused(live, token.value) == "certificate_required"
        assert refused(live, token.value, client_cert=agent_cert(broker, "agent-bob")) == (
            "certificate_mismatch"
        )
        # For another audience the verifier refuses it.
        other = mayfly.Verifier(
            issuer=broker.issuer, audience="https://tools.example.com", ca=broker.ca
        )
        assert refused(other, token.value, client_cert=agent_cert(broker)) == "wrong_audience"
        other.close()


def test_dpop_bound_tokens_need_a_fresh_proof(broker: Broker, live: mayfly.Verifier) -> None:
    key = mayfly.DpopKey()
    url = f"{API}/tickets"
    with mayfly.connect(profile=broker.profile) as b, b.task("r", audiences=[API]) as t:
        token = t.token(API, dpop=key)
        assert token.token_type == "DPoP"
        proof = key.proof("GET", url, token.value)
        presented = mayfly.DpopRequest(proof, "GET", url)
        assert live.verify(token.value, dpop=presented).dpop_key == key.jkt
        assert refused(live, token.value, dpop=presented) == "dpop_replayed"
        assert refused(live, token.value) == "dpop_required"
        cases = {
            "dpop_method": key.proof("POST", url, token.value),
            "dpop_url": key.proof("GET", f"{API}/other", token.value),
            "dpop_ath": key.proof("GET", url, "another token"),
            "dpop_wrong_key": mayfly.DpopKey().proof("GET", url, token.value),
        }
        for check, wrong in cases.items():
            dpop = mayfly.DpopRequest(wrong, "GET", url)
            assert refused(live, token.value, dpop=dpop) == check
        # A proof from a minute and more ago.
        stale = key.proof("GET", url, token.value)
        header, claims = (
            jwt.get_unverified_header(stale),
            jwt.decode(stale, options={"verify_signature": False}),
        )
        claims["iat"] -= 120
        old = jwt.encode(claims, key._key, algorithm="ES256", headers=header)
        assert refused(live, token.value, dpop=mayfly.DpopRequest(old, "GET", url)) == "dpop_stale"
        # An unbound token under the DPoP scheme.
        bearer = t.token(API, bind=False)
        assert refused(
            live,
            bearer.value,
            dpop=mayfly.DpopRequest(key.proof("GET", url, bearer.value), "GET", url),
        ) == ("not_dpop_bound")


def test_rfc8725_attacks_on_the_signature(broker: Broker, live: mayfly.Verifier) -> None:
    with mayfly.connect(profile=broker.profile) as b, b.task("r", audiences=[API]) as t:
        real = t.token(API, bind=False).value
    header = jwt.get_unverified_header(real)
    claims = jwt.decode(real, options={"verify_signature": False})
    kid = header["kid"]
    jwks = json.loads(live._http.get(broker.issuer + "/.well-known/jwks.json").text)
    public_jwk = next(k for k in jwks["keys"] if k["kid"] == kid)

    # alg none, in any spelling.
    for none in ("none", "None", "NONE"):
        assert refused(live, unsigned({**header, "alg": none}, claims) + ".") == "algorithm"
    # HS256 keyed with the broker's public key (key confusion).
    body = unsigned({**header, "alg": "HS256"}, claims)
    secret = json.dumps(public_jwk).encode()
    mac = hmac.new(secret, body.encode(), hashlib.sha256).digest()
    assert refused(live, f"{body}.{b64(mac)}") == "algorithm"
    # RS256 with the attacker's own RSA key under the broker's kid.
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    forged = jwt.encode(claims, rsa_key, algorithm="RS256", headers={**header, "alg": "RS256"})
    assert refused(live, forged) == "algorithm"
    # ES256 with another key, under the broker's kid: the signature fails.
    mine = ec.generate_private_key(ec.SECP256R1())
    assert refused(live, jwt.encode(claims, mine, algorithm="ES256", headers=header)) == (
        "bad_signature"
    )
    # The attacker's key in the header (jwk, jku) is never used.
    attacker = jwt.PyJWK.from_json(jwt.algorithms.ECAlgorithm.to_jwk(mine.public_key()))
    assert attacker.key is not None
    embedded = {
        **header,
        "kid": "attacker",
        "jwk": json.loads(jwt.algorithms.ECAlgorithm.to_jwk(mine.public_key())),
        "jku": "https://evil.test/jwks.json",
    }
    assert refused(live, jwt.encode(claims, mine, algorithm="ES256", headers=embedded)) == (
        "unknown_key"
    )
    # An EdDSA token under the ES256 key's kid.
    ed = ed25519.Ed25519PrivateKey.generate()
    assert refused(
        live, jwt.encode(claims, ed, algorithm="EdDSA", headers={**header, "alg": "EdDSA"})
    ) == ("key_algorithm_mismatch")
    # A tampered payload under the genuine signature.
    h, _, sig = real.split(".")
    widened = {**claims, "scope": "admin"}
    assert refused(live, f"{h}.{b64(json.dumps(widened).encode())}.{sig}") == "bad_signature"
    # Not a JWS at all.
    assert refused(live, "not-a-token") == "malformed"
    assert refused(live, real + ".extra") == "malformed"


@pytest.fixture
def pinned() -> Iterator[tuple[mayfly.Verifier, ec.EllipticCurvePrivateKey, Claims]]:
    """A verifier pinned to a key set of the test's own, a key of it, and
    claims it accepts."""
    key = ec.generate_private_key(ec.SECP256R1())
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="k1", alg="ES256", use="sig")
    v = mayfly.Verifier(issuer="https://broker.test", audience=API, jwks={"keys": [jwk]}, leeway=5)
    now = int(time.time())
    claims = {
        "iss": "https://broker.test",
        "sub": "spiffe://example.org/agent/demo",
        "aud": API,
        "exp": now + 60,
        "nbf": now,
        "iat": now,
        "jti": "lease1",
        "task_id": "task1",
        "scope": "read:t",
    }
    yield v, key, claims
    v.close()


HEADER = {"alg": "ES256", "typ": "at+jwt", "kid": "k1"}


def test_rfc8725_attacks_on_the_claims(
    pinned: tuple[mayfly.Verifier, ec.EllipticCurvePrivateKey, Claims],
) -> None:
    v, key, good = pinned

    def sign(claims: Claims, header: Claims = HEADER) -> str:
        return jwt.encode(claims, key, algorithm="ES256", headers=header)

    assert v.verify(sign(good)).agent == good["sub"]
    now = int(time.time())
    cases: dict[str, Claims] = {
        "expired": {**good, "exp": now - 30},
        "not_yet_valid": {**good, "nbf": now + 30},
        "wrong_issuer": {**good, "iss": "https://evil.test"},
        "wrong_audience": {**good, "aud": "https://tools.example.com"},
    }
    for check, claims in cases.items():
        assert refused(v, sign(claims)) == check, check
    # One audience, exactly ours: a list naming ours and another is refused.
    assert refused(v, sign({**good, "aud": [API, "https://evil.test"]})) == "wrong_audience"
    for name in ("exp", "sub", "jti", "nbf", "task_id", "iss", "aud"):
        claims = {k: val for k, val in good.items() if k != name}
        assert refused(v, sign(claims)) in ("missing_claim", "wrong_audience", "wrong_issuer")
    # A bound token without the certificate, and a DPoP-bound one as bearer.
    assert refused(v, sign({**good, "cnf": {"x5t#S256": "abc"}})) == "certificate_required"
    assert refused(v, sign({**good, "cnf": {"jkt": "abc"}})) == "dpop_required"
    # typ: an ID token or any other JWT is not an access token.
    for typ in ("JWT", None, "id+jwt"):
        header = {**HEADER, "typ": typ} if typ else {"alg": "ES256", "kid": "k1"}
        assert refused(v, sign(good, header)) == "wrong_type"
    # No kid, or one the set lacks (it refetches nothing: the set is pinned).
    assert refused(v, sign(good, {"alg": "ES256", "typ": "at+jwt"})) == "unknown_key"
    assert refused(v, sign(good, {**HEADER, "kid": "k2"})) == "unknown_key"
    assert refused(v, sign({**good, "sub": "admin"})) == "malformed"
    # A critical header extension nobody here understands (RFC 7515 §4.1.11).
    assert refused(v, sign(good, {**HEADER, "crit": ["exp"], "exp": 1})) == "malformed"
    # Within the leeway still passes.
    assert v.verify(sign({**good, "exp": now - 2})).lease_id == "lease1"


def test_a_silent_feed_fails_every_token_closed(own_broker: Broker) -> None:
    v = verifier(own_broker, silence=1.0)
    try:
        with mayfly.connect(profile=own_broker.profile) as b:
            t = b.start_task("r", audiences=[API])
            token = t.token(API, bind=False)
        assert v.verify(token.value).lease_id == token.lease_id
        own_broker.stop()
        stale = until_refused(v, token.value)
        assert stale.check == "feed_stale"
        assert stale.server_side
    finally:
        v.close()


def test_a_feed_that_never_synced_fails_closed(broker: Broker) -> None:
    f = feed(broker)
    nowhere = mayfly.FeedConfig("https://localhost:9", f.ca_pem, f.cert_pem, f.key_pem)
    v = mayfly.Verifier(issuer=broker.issuer, audience=API, ca=broker.ca, feed=nowhere)
    try:
        with mayfly.connect(profile=broker.profile) as b, b.task("r", audiences=[API]) as t:
            token = t.token(API, bind=False)
            assert refused(v, token.value) == "feed_not_synced"
    finally:
        v.close()


def test_the_feed_follower_resumes_after_the_broker_restarts(own_broker: Broker) -> None:
    v = verifier(own_broker, silence=30.0)
    try:
        with mayfly.connect(profile=own_broker.profile) as b:
            t = b.start_task("r", audiences=[API])
            token = t.token(API, bind=False)
        assert v.verify(token.value).lease_id == token.lease_id
        cursor = v.feed_cursor
        own_broker.stop()
        own_broker.start()
        # Revoked while the follower reconnects: it still learns of it.
        own_broker.cli("lease", "revoke", token.lease_id, "--reason", "test")
        assert until_refused(v, token.value).check == "revoked"
        assert v.feed_cursor > cursor
    finally:
        v.close()


def test_making_a_verifier_does_no_io_and_starts_no_thread() -> None:
    threads = set(threading.enumerate())
    nowhere = mayfly.FeedConfig("https://localhost:9", b"", b"", b"")
    v = mayfly.Verifier(
        issuer="https://localhost:9",
        audience=API,
        jwks_url="https://127.0.0.1:9/.well-known/jwks.json",
        feed=nowhere,
    )
    assert set(threading.enumerate()) == threads
    assert (v.jwks_fetches, v.feed_cursor) == (0, 0)
    v.close()
    with pytest.raises(RuntimeError, match="closed"):
        v.start()
    assert set(threading.enumerate()) == threads


def test_an_unreachable_jwks_shows_at_start_verify_and_averify() -> None:
    v = mayfly.Verifier(
        issuer="https://localhost:9", audience=API, jwks_url="https://127.0.0.1:9/jwks.json"
    )
    try:
        with pytest.raises(mayfly.VerifyError) as started:
            v.start()
        with pytest.raises(mayfly.VerifyError) as verified:
            v.verify("a.b.c")
        with pytest.raises(mayfly.VerifyError) as averified:
            asyncio.run(v.averify("a.b.c"))
        for e in (started, verified, averified):
            assert e.value.check == "jwks_unavailable"
            assert e.value.server_side
    finally:
        v.close()
    # Entering `with` starts it: the failure shows there, and it is closed.
    v = mayfly.Verifier(
        issuer="https://localhost:9", audience=API, jwks_url="https://127.0.0.1:9/jwks.json"
    )
    with pytest.raises(mayfly.VerifyError), v:
        pass
    with pytest.raises(RuntimeError, match="closed"):
        v.start()


def test_averify_raises_as_verify_does(
    pinned: tuple[mayfly.Verifier, ec.EllipticCurvePrivateKey, Claims],
) -> None:
    v, key, good = pinned
    token = jwt.encode(good, key, algorithm="ES256", headers=HEADER)
    expired = jwt.encode(
        {**good, "exp": int(time.time()) - 60}, key, algorithm="ES256", headers=HEADER
    )

    async def run() -> None:
        assert (await v.averify(token)).lease_id == "lease1"
        for bad, check in ((expired, "expired"), ("not-a-token", "malformed")):
            with pytest.raises(mayfly.VerifyError) as e:
                await v.averify(bad)
            assert e.value.check == check
        dpop = mayfly.DpopRequest("x.y.z", "GET", f"{API}/t")
        with pytest.raises(mayfly.VerifyError) as e:
            await v.averify(token, dpop=dpop)
        assert e.value.check == "not_dpop_bound"

    asyncio.run(run())
