"""A billing MCP server on the official MCP SDK, meant to sit behind the
Mayfly gateway: it checks no token itself, since the gateway in front of
it verifies the agent's token and has the broker decide every call on its
arguments before it is forwarded. It offers ``read_invoice``,
``pay_invoice`` and ``delete_records``.

With ``--log FILE`` it appends each call it receives as a JSON line, so a
test can show what reached it (and what did not).

    python billing.py --port 8790 [--log calls.jsonl]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import uvicorn
from mcp.server import MCPServer


def build(log: Path | None) -> MCPServer:
    """The server and its three tools."""
    server = MCPServer("billing")

    def seen(tool: str, arguments: dict[str, object]) -> None:
        if log is not None:
            with log.open("a") as f:
                f.write(json.dumps({"tool": tool, "arguments": arguments}) + "\n")

    @server.tool()
    def read_invoice(invoice_id: str) -> str:
        """Reads an invoice."""
        seen("read_invoice", {"invoice_id": invoice_id})
        return f"invoice {invoice_id}: 250.00 EUR to ACME, due 2027-01-01"

    @server.tool()
    def pay_invoice(invoice_id: str, amount: float) -> str:
        """Pays an invoice."""
        seen("pay_invoice", {"invoice_id": invoice_id, "amount": amount})
        return f"paid {amount:.2f} on invoice {invoice_id}"

    @server.tool()
    def delete_records(before: str | None = None) -> str:
        """Deletes billing records."""
        seen("delete_records", {"before": before})
        return "deleted"

    return server


def main() -> None:
    """Serves until interrupted."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, default=8790)
    p.add_argument("--log", type=Path, help="append each call received to this file")
    args = p.parse_args()
    server = build(args.log)
    uvicorn.run(server.streamable_http_app(), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
