"""The gateway with stock clients only: the official MCP SDK's client,
holding a task's token, talks through `mayfly gateway` to a billing server
built on the official SDK, under the example policies of deploy/policies;
httpx calls an API whose key only the gateway holds; an operator approves
with the `mayfly` CLI and reads the calls back with `mayfly audit trace`."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import httpx
import httpx2
import pytest
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from mcp.types import CallToolResult

from .conftest import API_KEY, Stack

T = TypeVar("T")


async def in_session(url: str, token: str, use: Callable[[ClientSession], Awaitable[T]]) -> T:
    """Runs `use` in an MCP session with `url`, the token on every request."""
    headers = {"Authorization": f"Bearer {token}"}
    async with (
        httpx2.AsyncClient(headers=headers, timeout=30.0) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        return await use(session)


def text(result: CallToolResult) -> str:
    assert not result.is_error, result
    return "\n".join(c.text for c in result.content if c.type == "text")


def refusal(
    call: Callable[[ClientSession], Awaitable[object]],
) -> Callable[[ClientSession], Awaitable[MCPError]]:
    """A session use that expects `call` to be refused: the error."""

    async def use(session: ClientSession) -> MCPError:
        with pytest.raises(MCPError) as refused:
            await call(session)
        error: MCPError = refused.value
        return error

    return use


def pending_approval(stack: Stack, task: str, not_these: set[str]) -> dict[str, Any]:
    """The approval `task` waits for (other than `not_these`), as an
    operator lists it."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        for a in json.loads(stack.cli("--json", "approval", "list")):
            if a["task_id"] == task and a["approval_id"] not in not_these:
                found: dict[str, Any] = a
                return found
        time.sleep(0.1)
    pytest.fail(f"no approval pending for {task}")


def test_calls_are_decided_filtered_approved_and_traced(stack: Stack) -> None:
    task = stack.task("pay this month's invoices")
    token = stack.token(task, stack.billing)

    async def reads_and_small_payments(session: ClientSession) -> list[str]:
        listed = await session.list_tools()
        names = [t.name for t in listed.tools]
        read = text(await session.call_tool("read_invoice", {"invoice_id": "inv-7"}))
        paid = text(await session.call_tool("pay_invoice", {"invoice_id": "inv-7", "amount": 80}))
        return [*names, read, paid]

    names_read_paid = asyncio.run(in_session(stack.billing, token, reads_and_small_payments))
    # The forbidden tool is not even listed.
    assert names_read_paid[:2] == ["read_invoice", "pay_invoice"]
    assert names_read_paid[2].startswith("invoice inv-7")
    assert names_read_paid[3] == "paid 80.00 on invoice inv-7"

    # Refused: the forbidden tool (called anyway), and arguments policy
    # cannot read as an amount.
    denied = asyncio.run(
        in_session(stack.billing, token, refusal(lambda s: s.call_tool("delete_records", {})))
    )
    assert denied.code == -32060
    assert denied.data["mayfly_error"] == "denied"
    assert denied.data["policy_id"] == "billing-no-deletes"

    # A large payment waits, held open, for an operator, then passes once.
    async def large_payment(session: ClientSession) -> str:
        return text(await session.call_tool("pay_invoice", {"invoice_id": "inv-9", "amount": 250}))

    async def approve_while_held() -> str:
        call = asyncio.create_task(in_session(stack.billing, token, large_payment))
        approval = await asyncio.to_thread(pending_approval, stack, task, set())
        assert approval["tool"] == "billing/pay_invoice"
        assert len(approval["arguments_sha256"]) == 64
        assert [c["tool"] for c in stack.billing_calls()] == ["read_invoice", "pay_invoice"]
        await asyncio.to_thread(
            stack.cli, "approval", "approve", approval["approval_id"], "--reason", "checked"
        )
        return await call

    assert asyncio.run(approve_while_held()) == "paid 250.00 on invoice inv-9"

    # Once: the same call again asks anew; denied, it never reaches the
    # server.
    async def deny_while_held(first: str) -> MCPError:
        call = asyncio.create_task(in_session(stack.billing, token, refusal(large_payment)))
        second = await asyncio.to_thread(pending_approval, stack, task, {first})
        await asyncio.to_thread(
            stack.cli, "approval", "deny", second["approval_id"], "--reason", "paid already"
        )
        return await call

    first = json.loads(stack.cli("--json", "approval", "list", "--all"))[0]["approval_id"]
    again = asyncio.run(deny_while_held(first))
    assert again.data["mayfly_error"] == "approval_denied"
    assert "paid already" in again.message
    assert [c["tool"] for c in stack.billing_calls()] == [
        "read_invoice",
        "pay_invoice",
        "pay_invoice",
    ]

    # The trace shows each call under its token, with decision and outcome.
    deadline = time.monotonic() + 10
    trace = ""
    while time.monotonic() < deadline:
        trace = stack.cli("audit", "trace", task)
        if trace.count("-> 200") >= 3:
            break
        time.sleep(0.2)
    lines = [line.strip() for line in trace.splitlines()]
    calls = [line for line in lines if line.startswith("call ")]
    assert len(calls) == 5, trace
    assert "billing/read_invoice allowed (policy billing-reads)" in calls[0]
    assert "-> 200 in" in calls[0]
    assert "billing/delete_records denied (policy billing-no-deletes)" in calls[2]
    assert "(approval " in calls[3], trace
    assert "-> 200" in calls[3], trace
    assert "billing/pay_invoice denied" in calls[4]
    # ...under the token that made them.
    token_line = next(i for i, line in enumerate(lines) if line.startswith("token "))
    assert lines[token_line + 1].startswith("call ")


def test_an_api_serves_an_agent_that_never_holds_its_key(stack: Stack) -> None:
    task = stack.task("pay a supplier")
    token = stack.token(task, stack.payments)
    answers: list[httpx.Response] = []
    with httpx.Client(headers={"Authorization": f"Bearer {token}"}) as http:
        for amount in (40, 4000):
            answers.append(
                http.post(f"{stack.payments}/v1/payments/inv-3", json={"amount": amount})
            )
    assert answers[0].status_code == 200, answers[0].text
    assert answers[0].json()["paid"] is True
    assert answers[1].status_code == 403, answers[1].text
    assert answers[1].headers["content-type"] == "application/problem+json"
    assert answers[1].json()["mayfly_error"] == "denied"
    seen_by_agent = [f"{r.status_code} {r.headers} {r.text}" for r in answers]
    # The API saw the key, once, and the agent's token never; the agent
    # never saw the key.
    assert len(stack.api.seen) == 1
    headers = stack.api.seen[0].headers
    assert headers["x-api-key"] == API_KEY
    assert "authorization" not in headers
    assert not any(API_KEY in s for s in seen_by_agent)


def test_the_next_call_after_the_task_completes_is_refused(stack: Stack) -> None:
    task = stack.task("read one invoice")
    token = stack.token(task, stack.billing)

    async def read(session: ClientSession) -> str:
        return text(await session.call_tool("read_invoice", {"invoice_id": "inv-1"}))

    assert asyncio.run(in_session(stack.billing, token, read)).startswith("invoice inv-1")
    before = len(stack.billing_calls())
    stack.cli("task", "complete", task)
    # Revoked on the feed (401 before any MCP message), or refused by the
    # broker's check of the task: either way, nothing goes on.
    with pytest.raises(Exception) as refused:  # noqa: PT011
        asyncio.run(in_session(stack.billing, token, read))
    cause: BaseException = refused.value
    while inner := getattr(cause, "exceptions", None):
        cause = inner[0]
    assert isinstance(cause, MCPError), cause
    assert len(stack.billing_calls()) == before
    # What the gateway told it: the token is revoked.
    r = httpx.post(
        stack.billing,
        json={"jsonrpc": "2.0", "id": 1, "method": "ping"},
        headers={"Authorization": f"Bearer {token}", "Accept": "application/json"},
    )
    assert r.status_code == 401
    assert "revoked" in r.headers["www-authenticate"]
