"""The verifier's JWKS cache: fetched on the first verify (making the
verifier fetches nothing), a key published after start is found by
refetching on its unknown `kid`, at most once per `min_refresh` however
many unknown kids arrive, and a JWKS that cannot be fetched keeps the keys
held and says the verifier, not the token, is at fault; a first fetch that
failed is tried again no more often. The JWKS is served over HTTPS by the
test (with the dev profile's server certificate)."""

from __future__ import annotations

import json
import ssl
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import mayfly
from tests.conftest import API, Broker

ISSUER = "https://broker.test"


class Keys:
    """Keys the test signs with, and which of them the JWKS publishes."""

    def __init__(self) -> None:
        self.private: dict[str, ec.EllipticCurvePrivateKey] = {}
        self.published: list[dict[str, Any]] = []
        self.up = True
        # Requests the JWKS server answered, up or not.
        self.served = 0

    def add(self, kid: str, publish: bool = True) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        self.private[kid] = key
        if publish:
            self.publish(kid)

    def publish(self, kid: str) -> None:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.private[kid].public_key()))
        jwk.update(kid=kid, alg="ES256", use="sig")
        self.published.append(jwk)

    def token(self, kid: str) -> str:
        now = int(time.time())
        claims = {
            "iss": ISSUER,
            "sub": "spiffe://example.org/agent/demo",
            "aud": API,
            "exp": now + 60,
            "nbf": now,
            "iat": now,
            "jti": f"lease-{kid}",
            "task_id": "task1",
        }
        headers = {"typ": "at+jwt", "kid": kid}
        return jwt.encode(claims, self.private[kid], algorithm="ES256", headers=headers)


@pytest.fixture
def jwks(broker: Broker) -> Iterator[tuple[str, Keys]]:
    keys = Keys()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            keys.served += 1
            if not keys.up:
                self.send_response(503)
                self.end_headers()
                return
            body = json.dumps({"keys": keys.published}).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(broker.profile / "server.pem", broker.profile / "server.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://localhost:{server.server_address[1]}/jwks.json", keys
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def verifier(broker: Broker, jwks: tuple[str, Keys]) -> Iterator[tuple[mayfly.Verifier, Keys]]:
    """A verifier of the test's JWKS, refetched at most every 0.3 s, and its
    keys: k1, published."""
    url, keys = jwks
    keys.add("k1")
    v = mayfly.Verifier(issuer=ISSUER, audience=API, ca=broker.ca, jwks_url=url, min_refresh=0.3)
    yield v, keys
    v.close()


def test_a_key_published_later_is_fetched_once_however_many_unknown_kids(
    verifier: tuple[mayfly.Verifier, Keys],
) -> None:
    v, keys = verifier
    keys.add("k2", publish=False)
    assert (v.jwks_fetches, keys.served) == (0, 0)
    assert v.verify(keys.token("k1")).lease_id == "lease-k1"
    assert v.jwks_fetches == 1
    time.sleep(0.35)
    # k2 is not published yet: one fetch, then no more within min_refresh.
    for _ in range(50):
        with pytest.raises(mayfly.VerifyError) as e:
            v.verify(keys.token("k2"))
        assert e.value.check == "unknown_key"
    assert v.jwks_fetches == 2
    keys.publish("k2")
    time.sleep(0.35)
    assert v.verify(keys.token("k2")).lease_id == "lease-k2"
    assert v.jwks_fetches == 3
    # A JWKS that cannot be fetched: the verifier's fault, keys kept.
    keys.up = False
    keys.add("k3")
    time.sleep(0.35)
    with pytest.raises(mayfly.VerifyError) as e:
        v.verify(keys.token("k3"))
    assert e.value.check == "jwks_unavailable"
    assert e.value.server_side
    assert v.verify(keys.token("k1")).lease_id == "lease-k1"


def test_a_jwks_over_tls_the_ca_does_not_vouch_for_is_refused(
    broker: Broker, jwks: tuple[str, Keys]
) -> None:
    url, keys = jwks
    keys.add("k1")
    # The system trust store does not know the dev CA.
    v = mayfly.Verifier(issuer=ISSUER, audience=API, jwks_url=url)
    with pytest.raises(mayfly.VerifyError) as e:
        v.start()
    assert e.value.check == "jwks_unavailable"
    v.close()


def test_a_first_fetch_that_failed_is_tried_again_once_per_min_refresh(
    verifier: tuple[mayfly.Verifier, Keys],
) -> None:
    v, keys = verifier
    keys.up = False
    for _ in range(20):
        with pytest.raises(mayfly.VerifyError) as e:
            v.verify(keys.token("k1"))
        assert e.value.check == "jwks_unavailable"
        assert e.value.server_side
    assert keys.served == 1
    # An explicit start tries at once.
    with pytest.raises(mayfly.VerifyError):
        v.start()
    assert keys.served == 2
    keys.up = True
    time.sleep(0.35)
    assert v.verify(keys.token("k1")).lease_id == "lease-k1"
    assert keys.served == 3
