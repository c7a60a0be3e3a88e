/**
 * A TypeScript agent that opens a task, and calls the example MCP server's
 * tool with the official MCP client: its requests go through `task.fetch`,
 * which adds the task's token for the server's URL (an audience of the
 * task) and nowhere else. Leaving the block completes the task.
 *
 *     node dist/examples/mcp/agent.js --profile .mayfly-dev --server http://127.0.0.1:8793/mcp
 */
import { parseArgs } from "node:util";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { connect } from "../../src/index.js";

const { values } = parseArgs({
  options: {
    profile: { type: "string", default: ".mayfly-dev" },
    server: { type: "string", default: "http://127.0.0.1:8793/mcp" },
    ticket: { type: "string", default: "42" },
  },
});
const server = values.server ?? "http://127.0.0.1:8793/mcp";

await using broker = connect({ profile: values.profile ?? ".mayfly-dev" });
await using task = await broker.startTask(`read ticket ${values.ticket}`, {
  audiences: [server],
  scopes: ["read:tickets"],
});
const client = new Client({ name: "mayfly-example-agent", version: "1.0.0" });
// The MCP SDK's bearer middleware takes the token alone: ask for an unbound one.
const transport = new StreamableHTTPClientTransport(new URL(server), {
  fetch: (url, init) => task.fetch(url, init, { bind: false }),
});
await client.connect(transport);
const tools = await client.listTools();
console.log("tools", tools.tools.map((t) => t.name).join(","));
const result = await client.callTool({ name: "read_ticket", arguments: { id: values.ticket } });
const content = result.content as { type: string; text: string }[];
console.log("result", content[0]?.text);
await client.close();
console.log("task", task.taskId);
