"""Agents without a client certificate: a broker trusting a Kubernetes-style
issuer (`[[federation]]` with a `jwks_file` made here with PyJWT), and
agents that connect with only its CA and a workload token: from a file, as
a pod reads its projected service-account token, or from a callable. The
tokens they get are bearer tokens (no certificate to bind to) whose `sub`
is the mapped SPIFFE ID, checked with PyJWT against the broker's JWKS. A
token already used on another connection is renewed once from its source;
one the source cannot renew is a typed refusal."""

from __future__ import annotations

import asyncio
import itertools
import json
import ssl
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

import mayfly
from tests.conftest import API, Broker, start_broker

K8S = "https://kubernetes.default.svc.cluster.local"
SUB = "system:serviceaccount:prod:billing"
MAPPED = "spiffe://example.org/agent/prod/billing"


class Issuer:
    """A Kubernetes-style token issuer: one EC key, its JWKS in a file."""

    def __init__(self, dir: Path) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(self.key.public_key()))
        jwk.update(kid="k8s-1", alg="ES256", use="sig")
        self.jwks = dir / "k8s-jwks.json"
        self.jwks.write_text(json.dumps({"keys": [jwk]}))

    def token(self, audience: str, *, jti: str | None = None, exp_in: int = 600) -> str:
        now = int(time.time())
        claims: dict[str, object] = {
            "iss": K8S,
            "aud": [audience],
            "sub": SUB,
            "iat": now,
            "nbf": now,
            "exp": now + exp_in,
            "jti": jti or uuid.uuid4().hex,
        }
        return jwt.encode(claims, self.key, algorithm="ES256", headers={"kid": "k8s-1"})


@pytest.fixture(scope="module")
def federated(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Issuer]]:
    root = tmp_path_factory.mktemp("federated")
    issuer = Issuer(root)
    entry = f"""
[[federation]]
issuer = "{K8S}"
jwks_file = "{issuer.jwks}"
algorithms = ["ES256"]
subject = "system:serviceaccount:{{ns}}:{{sa}}"
spiffe_id = "spiffe://example.org/agent/{{ns}}/{{sa}}"
"""
    b = start_broker(root, extra=entry)
    try:
        yield b, issuer
    finally:
        b.stop()


def validated(broker: Broker, token: str) -> dict[str, object]:
    client = jwt.PyJWKClient(
        f"{broker.issuer}/.well-known/jwks.json",
        ssl_context=ssl.create_default_context(cafile=str(broker.ca)),
    )
    key = client.get_signing_key_from_jwt(token)
    claims: dict[str, object] = jwt.decode(
        token, key.key, algorithms=["ES256", "RS256"], audience=API, issuer=broker.issuer
    )
    return claims


def test_a_pod_with_a_token_file_opens_a_task_and_gets_a_bearer_token(
    federated: tuple[Broker, Issuer], tmp_path: Path
) -> None:
    broker, issuer = federated
    path = tmp_path / "token"
    path.write_text(issuer.token(broker.issuer) + "\n")

    async def run() -> tuple[str, str]:
        conn = mayfly.connect(broker.grpc_url, ca=broker.ca, token_file=path)
        async with conn as b, b.task("bill", audiences=[API], scopes=["read:invoices"]) as t:
            assert t.info.agent_id == MAPPED
            token = await t.token(API, ["read:invoices"])
            # Certificate binding is not the default without a certificate,
            # and asking for it is refused by the broker.
            with pytest.raises(mayfly.InvalidRequest, match="cannot be bound"):
                await t.token(API, ["read:invoices"], bind=True)
            return token.value, t.task_id

    value, task_id = asyncio.run(run())
    claims = validated(broker, value)
    assert claims["sub"] == MAPPED
    assert "cnf" not in claims
    # The trail says how the agent was proven.
    trail = (broker.profile / "data" / "audit.jsonl").read_text().splitlines()
    started = [
        r
        for r in map(json.loads, trail)
        if r["event"] == "task_started" and r.get("task_id") == task_id
    ]
    assert [(r["caller"], r["authenticated_by"]) for r in started] == [(MAPPED, K8S)]


def counting(tokens: Callable[[], str]) -> tuple[mayfly.WorkloadToken, list[str]]:
    fetched: list[str] = []

    def fetch() -> str:
        fetched.append(tokens())
        return fetched[-1]

    return mayfly.WorkloadToken.from_callable(fetch, name="test issuer"), fetched


def test_a_token_used_on_another_connection_is_renewed_once(
    federated: tuple[Broker, Issuer],
) -> None:
    broker, issuer = federated
    # One source for two connections: the second presents the token the
    # first already used, is refused, and fetches a fresh one.
    source, fetched = counting(lambda: issuer.token(broker.issuer))
    owners: list[str] = []
    for _ in range(2):
        with mayfly.connect(broker.grpc_url, ca=broker.ca, token=source) as b:
            task = b.start_task("bill", audiences=[API], scopes=["read:invoices"])
            owners.append(task.info.agent_id)
            task.complete()
    assert owners == [MAPPED, MAPPED]
    assert len(fetched) == 2
    assert fetched[0] != fetched[1]

    # A source that can only give the used token again: the refusal comes
    # through, typed, after one renewal.
    same = itertools.repeat(fetched[0])
    stuck, again = counting(lambda: next(same))
    with (
        mayfly.connect(broker.grpc_url, ca=broker.ca, token=stuck) as b,
        pytest.raises(mayfly.Unauthenticated, match="already used") as refused,
    ):
        b.start_task("bill", audiences=[API], scopes=["read:invoices"])
    assert refused.value.error == "workload_token_used"
    assert len(again) == 2


def test_an_expired_token_is_refused_by_name(
    federated: tuple[Broker, Issuer], tmp_path: Path
) -> None:
    broker, issuer = federated
    path = tmp_path / "token"
    path.write_text(issuer.token(broker.issuer, exp_in=-300))
    with (
        mayfly.connect(broker.grpc_url, ca=broker.ca, token_file=path) as b,
        pytest.raises(mayfly.Unauthenticated, match="expired") as refused,
    ):
        b.start_task("bill", audiences=[API], scopes=["read:invoices"])
    assert refused.value.error == "workload_token_expired"


def test_a_token_and_a_certificate_or_no_token_are_configuration_errors(
    federated: tuple[Broker, Issuer], tmp_path: Path
) -> None:
    broker, _ = federated
    agent = broker.profile / "identities" / "agent-demo"
    with pytest.raises(mayfly.ConfigError, match="proves itself with one"):
        mayfly.connect(
            broker.grpc_url,
            ca=broker.ca,
            cert=agent / "svid.pem",
            key=agent / "svid.key",
            token_file=tmp_path / "token",
        )
    with pytest.raises(mayfly.ConfigError, match="cannot read the workload token file"):
        mayfly.connect(broker.grpc_url, ca=broker.ca, token_file=tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(mayfly.ConfigError, match="is empty"):
        mayfly.connect(broker.grpc_url, ca=broker.ca, token_file=empty)
    # The token never shows in a repr.
    token = mayfly.WorkloadToken.from_callable(lambda: "secret.value.here")
    token.current()
    assert "secret" not in repr(token)
