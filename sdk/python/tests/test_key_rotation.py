"""Signing-key rotation seen by a stock validator: two broker replicas on
one Redis (a real `redis-server` on a free port) share the key files; the
operator runs `mayfly keys rotate`; PyJWT's own `PyJWKClient` (which caches
the JWKS and refetches on an unknown kid) validates every token both
replicas issue throughout, and the old kid leaves both JWKS only after its
last token expired."""

from __future__ import annotations

import ssl
import subprocess
import time
from pathlib import Path

import httpx
import jwt

import mayfly
from tests.conftest import API, mayfly_bin, start_replicas


def kids(url: str, ca: Path) -> list[str]:
    keys = httpx.get(url, verify=ssl.create_default_context(cafile=str(ca))).json()["keys"]
    return [str(k["kid"]) for k in keys]


def test_a_key_rotation_fails_no_token_at_pyjwt(tmp_path: Path, redis_url: str) -> None:
    def edit(text: str) -> str:
        text = text.replace(
            'default_ttl = "5m"\nmax_ttl = "15m"', 'default_ttl = "2s"\nmax_ttl = "2s"'
        )
        text = text.replace(
            "[tokens]\n", '[tokens]\nretire_grace = "1s"\nkey_reload_interval = "100ms"\n'
        )
        assert "retire_grace" in text, "the dev config changed shape"
        return text

    replicas = start_replicas(tmp_path, redis_url, edit)
    profile, grpc, http, configs = (
        replicas.profile,
        replicas.grpc,
        replicas.http,
        replicas.configs,
    )
    ca = profile / "bundle.pem"
    agent = profile / "identities" / "agent-demo"
    try:
        brokers = [
            mayfly.Broker(
                mayfly.config.resolve(
                    f"https://localhost:{g}",
                    ca=ca,
                    cert=agent / "svid.pem",
                    key=agent / "svid.key",
                )
            )
            for g in grpc
        ]
        tasks = [b.start_task("rotate", audiences=[API], scopes=["read:t"]) for b in brokers]
        jwks_urls = [f"https://localhost:{h}/.well-known/jwks.json" for h in http]
        (old,) = kids(jwks_urls[0], ca)
        # A stock client: the JWKS kept 300 s, refetched for an unknown
        # kid at most once per `cooldown_duration` (30 s by default). The
        # rotation's lead must outlast that wait, as `mayfly keys rotate
        # --in 10m` does in production; this test runs it in seconds.
        client = jwt.PyJWKClient(
            jwks_urls[0],
            ssl_context=ssl.create_default_context(cafile=str(ca)),
            cooldown_duration=1,
        )
        # The validator holds the JWKS from before the rotation.
        first = tasks[0].token(API, ["read:t"], bind=False, ttl=2)
        assert client.get_signing_key_from_jwt(first.value).key_id == old
        rotated = subprocess.run(
            [mayfly_bin(), "keys", "rotate", "--config", str(configs[0]), "--in", "2s"],
            capture_output=True,
            text=True,
            check=True,
        )
        new = rotated.stdout.split("kid ", 1)[1].split(")", 1)[0]
        switch = time.time() + 2
        live: list[tuple[str, float]] = []
        failures: list[str] = []
        signed_by: set[str] = set()
        while time.time() < switch + 2 + 1 + 1.5:
            for t in tasks:
                token = t.token(API, ["read:t"], bind=False, ttl=2)
                t.forget(token.lease_id)
                live.append((token.value, token.expires_at.timestamp()))
            live = [(v, exp) for v, exp in live if exp > time.time()]
            for value, _ in live:
                kid = jwt.get_unverified_header(value)["kid"]
                signed_by.add(kid)
                try:
                    key = client.get_signing_key_from_jwt(value)
                    jwt.decode(
                        value,
                        key.key,
                        algorithms=["ES256"],
                        audience=API,
                        issuer=f"https://localhost:{http[0]}",
                    )
                except jwt.PyJWTError as e:
                    if jwt.decode(value, options={"verify_signature": False})["exp"] > time.time():
                        failures.append(f"{kid}: {e}")
            if any(jwt.get_unverified_header(v)["kid"] == old for v, _ in live):
                for url in jwks_urls:
                    assert old in kids(url, ca), "the old kid left while its tokens live"
            time.sleep(0.05)
        assert failures == []
        assert signed_by == {old, new}
        for url in jwks_urls:
            assert kids(url, ca) == [new]
        for b in brokers:
            b.close()
    finally:
        replicas.stop()
