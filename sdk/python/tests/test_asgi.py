"""`mayfly.asgi.TokenMiddleware` in front of a Starlette app (called over
ASGI in process by httpx's ASGI transport): RFC 6750 challenges for every
refusal, RFC 9728 `resource_metadata`, scopes, DPoP, and the agent side's
`httpx.Auth` reaching it with the right token."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import mayfly
from mayfly.asgi import TokenMiddleware, token_of
from mayfly.reports import RequestReports
from tests.conftest import API, Broker

METADATA = f"{API}/.well-known/oauth-protected-resource"


async def ticket(request: Request) -> JSONResponse:
    token = token_of(request.state)
    return JSONResponse({"agent": token.agent, "task": token.task_id, "actor": token.actor_id})


@pytest.fixture(scope="module")
def app(broker: Broker) -> Iterator[TokenMiddleware]:
    verifier = mayfly.Verifier(
        issuer=broker.issuer,
        audience=API,
        ca=broker.ca,
        feed=mayfly.FeedConfig.from_profile(broker.profile, "api-tickets"),
    )
    assert verifier.wait_for_feed(10)
    inner = Starlette(routes=[Route("/tickets/{id}", ticket)])
    yield TokenMiddleware(inner, verifier, scopes=["read:tickets"], resource_metadata=METADATA)
    verifier.close()


def client(app: TokenMiddleware, auth: httpx.Auth | None = None) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=API, auth=auth)


def test_refusals_carry_rfc6750_challenges(broker: Broker, app: TokenMiddleware) -> None:
    async def run() -> None:
        async with (
            mayfly.connect(profile=broker.profile) as b,
            b.task("read", audiences=[API], scopes=["read:tickets", "read:other"]) as t,
            client(app) as http,
        ):
            r = await http.get("/tickets/42")
            assert r.status_code == 401
            challenge = r.headers["www-authenticate"]
            assert challenge.startswith('Bearer realm="mayfly"')
            assert f'resource_metadata="{METADATA}"' in challenge
            assert "error=" not in challenge

            r = await http.get("/tickets/42", headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401
            assert 'error="invalid_token"' in r.headers["www-authenticate"]
            assert 'error_description="malformed"' in r.headers["www-authenticate"]

            bound = await t.token(API, ["read:tickets"])
            r = await http.get("/tickets/42", headers={"Authorization": bound.authorization})
            assert r.status_code == 401
            assert 'error_description="certificate_required"' in r.headers["www-authenticate"]

            other = await t.token(API, ["read:other"], bind=False)
            r = await http.get("/tickets/42", headers={"Authorization": other.authorization})
            assert r.status_code == 403
            assert 'error="insufficient_scope"' in r.headers["www-authenticate"]
            assert 'scope="read:tickets"' in r.headers["www-authenticate"]

            good = await t.token(API, ["read:tickets"], bind=False)
            r = await http.get("/tickets/42", headers={"Authorization": good.authorization})
            assert r.status_code == 200
            assert r.json() == {
                "agent": t.info.agent_id,
                "task": t.task_id,
                "actor": t.info.agent_id,
            }

            # Revoked: refused as soon as the feed says so.
            await t.complete()
            for _ in range(500):
                r = await http.get("/tickets/42", headers={"Authorization": good.authorization})
                if r.status_code == 401:
                    break
                await asyncio.sleep(0.01)
            assert 'error_description="revoked"' in r.headers["www-authenticate"]

    asyncio.run(run())


def test_an_agent_reaches_the_service_with_httpx_auth_and_dpop(
    broker: Broker, app: TokenMiddleware
) -> None:
    key = mayfly.DpopKey()

    async def run() -> None:
        async with (
            mayfly.connect(profile=broker.profile) as b,
            b.task("read", audiences=[API], scopes=["read:tickets"]) as t,
        ):
            async with client(app, t.auth(bind=False)) as http:
                r = await http.get("/tickets/7")
                assert r.status_code == 200, r.text
                assert r.json()["task"] == t.task_id
            async with client(app, t.auth(dpop=key)) as http:
                r = await http.get("/tickets/8")
                assert r.status_code == 200, r.text
                assert r.request.headers["authorization"].startswith("DPoP ")
            # The same proof twice is a replay.
            token = await t.token(API, ["read:tickets"], dpop=key)
            headers = {
                "Authorization": token.authorization,
                "DPoP": key.proof("GET", f"{API}/tickets/9", token.value),
            }
            async with client(app) as http:
                assert (await http.get("/tickets/9", headers=headers)).status_code == 200
                r = await http.get("/tickets/9", headers=headers)
                assert r.status_code == 401
                assert r.headers["www-authenticate"].startswith("DPoP ")
                assert 'error_description="dpop_replayed"' in r.headers["www-authenticate"]

    asyncio.run(run())


def test_a_bound_token_passes_with_the_certificate_the_server_reports(
    broker: Broker, app: TokenMiddleware
) -> None:
    """The ASGI TLS extension (asgi.readthedocs.io, specs/tls) carries the
    client's chain as PEM; uvicorn does not fill it, so the scope a server
    that does would pass is built here."""
    agent_pem = (broker.profile / "identities" / "agent-demo" / "svid.pem").read_text()
    bob_pem = (broker.profile / "identities" / "agent-bob" / "svid.pem").read_text()

    async def call(token: str, chain: list[str]) -> tuple[int, dict[str, str]]:
        sent: list[dict[str, object]] = []

        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: dict[str, object]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": "GET",
            "scheme": "https",
            "path": "/tickets/42",
            "raw_path": b"/tickets/42",
            "root_path": "",
            "query_string": b"",
            "headers": [(b"host", b"api.example.com"), (b"authorization", token.encode())],
            "server": ("api.example.com", 443),
            "extensions": {"tls": {"client_cert_chain": chain, "tls_version": 0x0304}},
        }
        await app(scope, receive, send)  # type: ignore[arg-type]
        start = sent[0]
        headers = {k.decode(): v.decode() for k, v in start["headers"]}  # type: ignore[attr-defined]
        return int(start["status"]), headers  # type: ignore[call-overload]

    async def run() -> None:
        async with (
            mayfly.connect(profile=broker.profile) as b,
            b.task("read", audiences=[API], scopes=["read:tickets"]) as t,
        ):
            token = (await t.token(API, ["read:tickets"])).authorization
            assert (await call(token, [agent_pem]))[0] == 200
            status, headers = await call(token, [bob_pem])
            assert status == 401
            assert 'error_description="certificate_mismatch"' in headers["www-authenticate"]
            status, headers = await call(token, [])
            assert 'error_description="certificate_required"' in headers["www-authenticate"]

    asyncio.run(run())


def test_requests_are_reported_under_their_lease(broker: Broker) -> None:
    feed = mayfly.FeedConfig.from_profile(broker.profile, "api-tickets")
    verifier = mayfly.Verifier(issuer=broker.issuer, audience=API, ca=broker.ca, feed=feed)
    assert verifier.wait_for_feed(10)
    reports = RequestReports(feed)
    inner = Starlette(routes=[Route("/tickets/{id}", ticket)])
    app = TokenMiddleware(inner, verifier, scopes=["read:tickets"], reports=reports)

    async def run() -> tuple[str, str]:
        async with (
            mayfly.connect(profile=broker.profile) as b,
            b.task("read", audiences=[API], scopes=["read:tickets"]) as t,
            client(app) as http,
        ):
            good = await t.token(API, ["read:tickets"], bind=False)
            headers = {"Authorization": good.authorization}
            assert (
                await http.get("/tickets/42?q=never-reported", headers=headers)
            ).status_code == 200
            await t.complete()
            for _ in range(500):
                if (await http.get("/tickets/42", headers=headers)).status_code == 401:
                    break
                await asyncio.sleep(0.01)
            # Not reported: a token whose jti could be anyone's.
            assert (
                await http.get("/tickets/1", headers={"Authorization": "Bearer x.y.z"})
            ).status_code == 401
            return good.lease_id, t.task_id

    lease, task = asyncio.run(run())
    reports.close()
    verifier.close()
    assert (reports.reported, reports.lost) == (2, 0)
    trail = (broker.profile / "data" / "audit.jsonl").read_text().splitlines()
    served = [
        r
        for r in map(json.loads, trail)
        if r["event"] == "request_served" and r["lease_id"] == lease
    ]
    assert [(r["decision"], r["route"], r["status"], r.get("reason")) for r in served] == [
        ("accepted", "/tickets/{id}", 200, None),
        ("refused", "/tickets/42", 401, "revoked"),
    ]
    for r in served:
        assert r["task_id"] == task
        assert r["caller"] == "spiffe://example.org/api/tickets"
        assert "never-reported" not in json.dumps(r)
