"""An agent calling tools through the Mayfly gateway with the official MCP
SDK's client, holding nothing but a task's token.

    python agent.py --token "$TOKEN" list
    python agent.py --token "$TOKEN" call pay_invoice invoice_id=inv-7 amount=80

An argument's value is read as JSON when it is JSON (``amount=80`` is a
number), else as a string. A refused call exits 1 with the gateway's
reason: the broker's error name, and the policy or the approval.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

DEFAULT_URL = "http://127.0.0.1:8730/billing/mcp"


def arguments(pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs as a tool's arguments."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"agent: {pair!r} is not key=value")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


#: What the gateway said when it refused at the HTTP level (a 401 for a
#: revoked token, say), which the MCP client reports only as an error.
REFUSED: list[str] = []


async def remember_refusal(response: httpx2.Response) -> None:
    if response.status_code >= 400:
        await response.aread()
        why = response.headers.get("www-authenticate") or response.text.strip()
        REFUSED.append(f"HTTP {response.status_code}: {why}")


async def run(url: str, token: str, command: str, tool: str | None, args: list[str]) -> str:
    """Lists the tools, or calls one: what to print."""
    async with (
        httpx2.AsyncClient(
            headers={"Authorization": f"Bearer {token}"},
            timeout=60.0,
            event_hooks={"response": [remember_refusal]},
        ) as http,
        streamable_http_client(url, http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        await session.initialize()
        if command == "list":
            listed = await session.list_tools()
            return "\n".join(t.name for t in listed.tools)
        if tool is None:
            sys.exit("agent: call needs a tool")
        result = await session.call_tool(tool, arguments(args))
        texts = [c.text for c in result.content if c.type == "text"]
        if result.is_error:
            sys.exit(f"agent: the tool failed: {texts}")
        return "\n".join(texts)


def describe(e: MCPError) -> str:
    """A refusal in one line: why, and under which policy or approval."""
    data = e.data if isinstance(e.data, dict) else {}
    extra = [f"{k} {data[k]}" for k in ("policy_id", "approval_id") if k in data]
    name = data.get("mayfly_error", "error")
    return f"refused ({name}): {e.message}" + (f" [{', '.join(extra)}]" if extra else "")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default=DEFAULT_URL, help="the MCP endpoint on the gateway")
    p.add_argument("--token", required=True, help="a task's token for the upstream's audience")
    p.add_argument("command", choices=["list", "call"])
    p.add_argument("tool", nargs="?", help="for call: the tool")
    p.add_argument("args", nargs="*", help="for call: key=value arguments")
    a = p.parse_args()
    if a.command == "call" and a.tool is None:
        p.error("call needs a tool")
    try:
        print(asyncio.run(run(a.url, a.token, a.command, a.tool, a.args)))
    except Exception as e:
        # The MCP client reports a failure inside its task group as an
        # exception group: its first member says what went wrong.
        cause: BaseException = e
        while inner := getattr(cause, "exceptions", None):
            cause = inner[0]
        if REFUSED:
            sys.exit(f"agent: refused: {REFUSED[-1]}")
        sys.exit(f"agent: {describe(cause) if isinstance(cause, MCPError) else cause}")


if __name__ == "__main__":
    main()
