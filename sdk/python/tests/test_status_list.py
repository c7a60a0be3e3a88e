"""The Token Status List (draft-ietf-oauth-status-list) as a validator in
another stack reads it: a validator written here with nothing but PyJWT,
zlib and an HTTP client (no Mayfly code) follows the `status` claim of
each token to its signed list, and sees a revocation within the list's
`ttl`. On the embedded store, and with two replicas on one Redis (a real
`redis-server` on a free port): a token minted through one replica and
revoked through the other shows its bit in the lists both serve."""

from __future__ import annotations

import asyncio
import base64
import ssl
import subprocess
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import jwt
import pytest

import mayfly
from mayfly.verify import _StatusLists
from tests.conftest import API, Broker, mayfly_bin, start_broker, start_replicas

TTL = 2


@dataclass
class Fetched:
    bits: bytes
    until: float


class StatusListValidator:
    """What a relying party does (the draft's section 8): fetch the list the
    token names, check the Status List Token (signature against the
    issuer's JWKS, `typ`, `sub` equal to the URI, `iss` equal to the
    token's), keep it for its `ttl`, and read the token's bit."""

    def __init__(self, issuer: str, ca: Path) -> None:
        self.issuer = issuer
        self.tls = ssl.create_default_context(cafile=str(ca))
        self.jwks = jwt.PyJWKClient(f"{issuer}/.well-known/jwks.json", ssl_context=self.tls)
        self.cache: dict[str, Fetched] = {}
        self.fetches = 0

    def claims(self, token: str) -> dict[str, Any]:
        key = self.jwks.get_signing_key_from_jwt(token)
        claims: dict[str, Any] = jwt.decode(
            token, key.key, algorithms=["ES256"], audience=API, issuer=self.issuer
        )
        return claims

    def fetch(self, uri: str) -> Fetched:
        answer = httpx.get(uri, headers={"Accept": "application/statuslist+jwt"}, verify=self.tls)
        answer.raise_for_status()
        assert answer.headers["content-type"] == "application/statuslist+jwt"
        token = answer.text
        assert jwt.get_unverified_header(token)["typ"] == "statuslist+jwt"
        key = self.jwks.get_signing_key_from_jwt(token)
        claims = jwt.decode(
            token,
            key.key,
            algorithms=["ES256"],
            issuer=self.issuer,
            options={"require": ["sub", "iat", "exp"]},
        )
        assert claims["sub"] == uri
        assert claims["status_list"]["bits"] == 1
        lst = claims["status_list"]["lst"]
        bits = zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)))
        self.fetches += 1
        return Fetched(bits, time.monotonic() + float(claims["ttl"]))

    def revoked(self, token: str) -> bool:
        ref = self.claims(token)["status"]["status_list"]
        uri, idx = ref["uri"], ref["idx"]
        got = self.cache.get(uri)
        if got is None or time.monotonic() >= got.until:
            got = self.cache[uri] = self.fetch(uri)
        return bool(got.bits[idx // 8] >> (idx % 8) & 1)


def with_ttl(config: Path) -> None:
    text = config.read_text()
    assert "[tokens]\n" in text, "the dev config changed shape"
    config.write_text(text.replace("[tokens]\n", f'[tokens]\nstatus_list_ttl = "{TTL}s"\n'))


def seen_revoked_after(validator: StatusListValidator, token: str) -> float:
    """Seconds from now until `validator` says `token` is revoked."""
    start = time.monotonic()
    while not validator.revoked(token):
        assert time.monotonic() - start < 10 * TTL, "the revocation never reached the list"
        time.sleep(0.02)
    return time.monotonic() - start


@pytest.fixture
def listed_broker(tmp_path: Path) -> Any:  # noqa: ANN401 - the fixture's Broker
    b = start_broker(tmp_path)
    b.stop()
    with_ttl(b.config)
    b.start()
    try:
        yield b
    finally:
        b.stop()


def fresh_token(task: mayfly.Task) -> mayfly.Token:
    """A new token (the task's cache would hand out the same one again)."""
    token = task.token(API, ["read:t"], bind=False, ttl=60)
    task.forget(token.lease_id)
    return token


def connect(grpc_url: str, profile: Path) -> mayfly.Broker:
    agent = profile / "identities" / "agent-demo"
    return mayfly.Broker(
        mayfly.config.resolve(
            grpc_url, ca=profile / "bundle.pem", cert=agent / "svid.pem", key=agent / "svid.key"
        )
    )


def test_a_revoked_token_shows_in_its_list_within_the_ttl(listed_broker: Broker) -> None:
    b = listed_broker
    validator = StatusListValidator(b.issuer, b.ca)
    meta = httpx.get(
        f"{b.issuer}/.well-known/oauth-authorization-server", verify=validator.tls
    ).json()
    client = connect(b.grpc_url, b.profile)
    task = client.start_task("status", audiences=[API], scopes=["read:t"])
    tokens = [fresh_token(task) for _ in range(3)]
    refs = [validator.claims(t.value)["status"]["status_list"] for t in tokens]
    # Distinct indexes in one list, which the metadata names.
    assert len({r["idx"] for r in refs}) == 3
    (uri,) = {r["uri"] for r in refs}
    lists = httpx.get(meta["status_list_aggregation_endpoint"], verify=validator.tls).json()
    assert uri in lists["status_lists"]
    assert not any(validator.revoked(t.value) for t in tokens)
    # A Status List Token is no access token: refused for its typ.
    listed = httpx.get(uri, verify=validator.tls).text
    with (
        mayfly.Verifier(issuer=b.issuer, audience=API, ca=b.ca) as verifier,
        pytest.raises(mayfly.VerifyError) as refused,
    ):
        verifier.verify(listed)
    assert refused.value.check == "wrong_type"

    b.cli("lease", "revoke", tokens[1].lease_id, "--reason", "status list test")
    took = seen_revoked_after(validator, tokens[1].value)
    # The validator refetches once its copy's ttl ran out; the broker
    # looks at the store at most every 200 ms.
    assert took < TTL + 1, f"seen {took:.2f}s after the revoke"
    assert not validator.revoked(tokens[0].value)
    assert not validator.revoked(tokens[2].value)

    # Completing the task revokes the rest, and the list shows it.
    task.complete()
    for t in (tokens[0], tokens[2]):
        assert seen_revoked_after(validator, t.value) < TTL + 1
    client.close()


def test_a_list_that_no_token_names_is_not_found(listed_broker: Broker) -> None:
    tls = ssl.create_default_context(cafile=str(listed_broker.ca))
    for n in ("7", "-1", "01", "x", "18446744073709551616"):
        answer = httpx.get(f"{listed_broker.issuer}/statuslists/{n}", verify=tls)
        assert answer.status_code == 404, n


def test_two_replicas_serve_the_same_bits(tmp_path: Path, redis_url: str) -> None:
    replicas = start_replicas(
        tmp_path,
        redis_url,
        lambda text: text.replace("[tokens]\n", f'[tokens]\nstatus_list_ttl = "{TTL}s"\n'),
    )
    profile, grpc, http = replicas.profile, replicas.grpc, replicas.http
    try:
        clients = [connect(f"https://localhost:{g}", profile) for g in grpc]
        tasks = [c.start_task("replicas", audiences=[API], scopes=["read:t"]) for c in clients]
        tokens = [fresh_token(t) for t in tasks for _ in range(2)]
        issuer = f"https://localhost:{http[0]}"
        # Each replica's list, read by its own validator (the URI names
        # the issuer; the validator fetches from the replica it talks to).
        validators = [StatusListValidator(issuer, profile / "bundle.pem") for _ in range(2)]
        idxs = [validators[0].claims(t.value)["status"]["status_list"]["idx"] for t in tokens]
        assert len(set(idxs)) == 4, "two replicas handed out one index twice"

        def bit(replica: int, token: mayfly.Token) -> bool:
            ref = validators[replica].claims(token.value)["status"]["status_list"]
            own = ref["uri"].replace(f":{http[0]}/", f":{http[replica]}/")
            got = fetch_from(validators[replica], own, ref["uri"])
            return bool(got.bits[ref["idx"] // 8] >> (ref["idx"] % 8) & 1)

        # Minted through replica 0, revoked through replica 1.
        minted_on_0 = tokens[0]
        subprocess.run(
            [
                mayfly_bin(),
                "--profile",
                str(profile),
                "--broker",
                f"https://localhost:{grpc[1]}",
                "lease",
                "revoke",
                minted_on_0.lease_id,
            ],
            check=True,
            capture_output=True,
        )
        deadline = time.monotonic() + 2 * TTL
        while not (bit(0, minted_on_0) and bit(1, minted_on_0)):
            assert time.monotonic() < deadline, "a replica's list never showed the revoke"
            time.sleep(0.05)
        for replica in (0, 1):
            assert [bit(replica, t) for t in tokens] == [True, False, False, False]
        for c in clients:
            c.close()
    finally:
        replicas.stop()


def fetch_from(v: StatusListValidator, url: str, sub: str) -> Fetched:
    """The list at `url` (a replica's own port), checked as the list `sub`
    names."""
    answer = httpx.get(url, verify=v.tls)
    answer.raise_for_status()
    token = answer.text
    key = v.jwks.get_signing_key_from_jwt(token)
    claims = jwt.decode(token, key.key, algorithms=["ES256"], issuer=v.issuer)
    assert claims["sub"] == sub
    lst = claims["status_list"]["lst"]
    return Fetched(
        zlib.decompress(base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4))),
        time.monotonic() + float(claims["ttl"]),
    )


def refused_because(verifier: mayfly.Verifier, token: mayfly.Token) -> str | None:
    try:
        verifier.verify(token.value)
    except mayfly.VerifyError as e:
        return e.check
    return None


def test_the_verifier_reads_status_lists_instead_of_the_feed(listed_broker: Broker) -> None:
    b = listed_broker
    client = connect(b.grpc_url, b.profile)
    task = client.start_task("verifier", audiences=[API], scopes=["read:t"])
    doomed, kept = fresh_token(task), fresh_token(task)
    verifier = mayfly.Verifier(
        issuer=b.issuer, audience=API, ca=b.ca, status_lists=mayfly.StatusListConfig()
    )
    with verifier:
        assert verifier.verify(doomed.value).lease_id == doomed.lease_id
        assert verifier.verify(kept.value).lease_id == kept.lease_id

        b.cli("lease", "revoke", doomed.lease_id)
        start = time.monotonic()
        while (refusal := refused_because(verifier, doomed)) is None:
            assert time.monotonic() - start < TTL + 1, "the verifier never saw the revoke"
            time.sleep(0.02)
        assert refusal == "revoked"
        assert asyncio.run(verifier.averify(kept.value)).lease_id == kept.lease_id

        # The broker gone, a list older than its ttl is not trusted: every
        # token of it is refused, as the broker's side of the failure.
        b.stop()
        time.sleep(TTL + 0.2)
        with pytest.raises(mayfly.VerifyError) as refused:
            verifier.verify(kept.value)
        assert refused.value.check == "status_unavailable"
        assert refused.value.server_side
    client.close()


def test_a_status_list_outside_the_issuer_is_never_fetched() -> None:
    lists = _StatusLists("https://broker.example", mayfly.StatusListConfig())
    good = {"status": {"status_list": {"idx": 3, "uri": "https://broker.example/statuslists/0"}}}
    assert lists.ref(good) == ("https://broker.example/statuslists/0", 3)
    for uri, idx in [
        ("https://attacker.example/statuslists/0", 3),
        ("https://broker.example/statuslists/../admin", 3),
        ("https://broker.example.attacker.example/statuslists/0", 3),
        ("https://broker.example/statuslists/0", -1),
        ("https://broker.example/statuslists/0", True),
        ("https://broker.example/statuslists/0", "3"),
    ]:
        with pytest.raises(mayfly.VerifyError) as refused:
            lists.ref({"status": {"status_list": {"idx": idx, "uri": uri}}})
        assert refused.value.check == "status_missing", (uri, idx)
    with pytest.raises(mayfly.VerifyError):
        lists.ref({})
