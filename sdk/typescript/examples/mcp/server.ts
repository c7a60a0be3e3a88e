/**
 * An MCP tool server on the official TypeScript SDK whose tools need a
 * Mayfly token: the SDK's own bearer-auth middleware, with the Mayfly
 * Verifier behind it (following the broker's revocation feed), in front of
 * a stateless Streamable HTTP endpoint.
 *
 *     node dist/examples/mcp/server.js --profile .mayfly-dev --port 8793
 *
 * The MCP endpoint, http://127.0.0.1:PORT/mcp, is the tokens' audience.
 */

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { requireBearerAuth } from "@modelcontextprotocol/sdk/server/auth/middleware/bearerAuth.js";
import { McpServer } from "@modelcontextprotocol/sdk/server/mcp.js";
import { StreamableHTTPServerTransport } from "@modelcontextprotocol/sdk/server/streamableHttp.js";
import express from "express";
import { z } from "zod";
import { readProfile } from "../../src/config.js";
import { OAuthTokenVerifier } from "../../src/mcp.js";
import { feedFromProfile, Verifier } from "../../src/verify/index.js";

const { values } = parseArgs({
  options: {
    profile: { type: "string", default: ".mayfly-dev" },
    identity: { type: "string", default: "api-tickets" },
    issuer: { type: "string" },
    port: { type: "string", default: "8793" },
  },
});
const profile = values.profile ?? ".mayfly-dev";
const resource = `http://127.0.0.1:${values.port}/mcp`;
const verifier = new Verifier({
  issuer: values.issuer ?? "https://localhost:8711",
  audience: resource,
  ca: readFileSync(join(profile, readProfile(profile).ca ?? "bundle.pem"), "utf8"),
  feed: feedFromProfile(profile, values.identity ?? "api-tickets"),
});
if (!(await verifier.waitForFeed(30_000))) {
  console.error("the revocation feed did not answer");
  process.exit(1);
}

function tools(): McpServer {
  const server = new McpServer({ name: "tickets", version: "1.0.0" });
  server.registerTool(
    "read_ticket",
    { description: "Reads a ticket", inputSchema: { id: z.string() } },
    async ({ id }, extra) => ({
      content: [
        {
          type: "text",
          text: JSON.stringify({
            ticket: id,
            agent: extra.authInfo?.clientId,
            task: extra.authInfo?.extra?.taskId,
          }),
        },
      ],
    }),
  );
  return server;
}

const app = express();
app.use(express.json({ limit: "64kb" }));
app.post(
  "/mcp",
  requireBearerAuth({
    verifier: new OAuthTokenVerifier(verifier),
    requiredScopes: ["read:tickets"],
    expectedResource: new URL(resource),
  }),
  async (req, res) => {
    // Stateless: one server and transport per request.
    const server = tools();
    const transport = new StreamableHTTPServerTransport({ sessionIdGenerator: undefined });
    res.on("close", () => {
      void transport.close();
      void server.close();
    });
    await server.connect(transport);
    await transport.handleRequest(req, res, req.body);
  },
);
app.listen(Number(values.port), "127.0.0.1", () => console.log(`listening on ${resource}`));
