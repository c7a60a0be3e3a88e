"""An agent that opens a Mayfly task with the SDK and calls a tool of an
MCP server (the official `mcp` client) with the task's token. Leaving the
task block completes the task, which revokes the token.

    python mcp_agent.py --server http://127.0.0.1:8790/mcp   # in the dir with .mayfly-dev
"""

from __future__ import annotations

import argparse
import asyncio

import httpx2
from mcp.client.session import ClientSession
from mcp.client.streamable_http import streamable_http_client

import mayfly


async def summarise(server: str, ticket: int, profile: str | None = None) -> str:
    async with (
        mayfly.connect(profile=profile) as broker,
        broker.task(
            f"summarise ticket {ticket}", audiences=[server], scopes=["read:tickets"]
        ) as task,
    ):
        # Bound to nothing: the MCP transport is plain HTTP here, so the
        # server could not see the agent's certificate.
        token = await task.token(server, ["read:tickets"], bind=False)
        async with (
            httpx2.AsyncClient(headers={"Authorization": token.authorization}) as http,
            streamable_http_client(server, http_client=http) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            result = await session.call_tool("summarise_ticket", {"ticket": ticket})
            texts = [c.text for c in result.content if c.type == "text"]
            if result.is_error:
                raise RuntimeError(f"the tool failed: {texts}")
            return "\n".join(texts)


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--server", required=True, help="the MCP server's URL")
    p.add_argument("--ticket", type=int, default=42)
    p.add_argument("--profile", help="a `mayfly dev init` directory (default ./.mayfly-dev)")
    args = p.parse_args()
    print(asyncio.run(summarise(args.server, args.ticket, args.profile)))


if __name__ == "__main__":
    main()
