/**
 * The MCP example: its server (the official MCP SDK's bearer-auth middleware
 * with the Mayfly Verifier behind it) called by its agent through the
 * official MCP client, and refusals of what must not pass: no token, a
 * certificate-bound token (its proof cannot reach that middleware), a token
 * after its task completed.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { connect } from "../src/index.js";
import { eventually, freePort, readPolicy, startBroker, TD, type TestBroker } from "./broker.js";

const EXAMPLE = join(dirname(fileURLToPath(import.meta.url)), "..", "examples", "mcp");
let broker: TestBroker;
let server: ChildProcess;
let resource = "";

before(async () => {
  const port = await freePort();
  resource = `http://127.0.0.1:${port}/mcp`;
  broker = await startBroker({ policies: readPolicy("mcp-tickets", resource) });
  server = spawn(
    process.execPath,
    [
      join(EXAMPLE, "server.js"),
      "--profile",
      broker.profile,
      "--issuer",
      broker.issuer,
      "--port",
      String(port),
    ],
    { stdio: ["ignore", "pipe", "inherit"] },
  );
  let out = "";
  server.stdout?.on("data", (d: Buffer) => {
    out += d.toString();
  });
  await eventually("the MCP server listens", () => out.includes("listening on"), 30_000);
});

after(async () => {
  server.kill();
  await broker.stop();
});

async function client(
  fetchImpl: (url: string | URL, init?: RequestInit) => Promise<Response>,
): Promise<Client> {
  const c = new Client({ name: "test", version: "1.0.0" });
  await c.connect(new StreamableHTTPClientTransport(new URL(resource), { fetch: fetchImpl }));
  return c;
}

test("the example agent opens a task and calls the tool with the official MCP client", async () => {
  const { stdout } = await promisify(execFile)(process.execPath, [
    join(EXAMPLE, "agent.js"),
    "--profile",
    broker.profile,
    "--server",
    resource,
  ]);
  assert.match(stdout, /^tools read_ticket$/m);
  const result = JSON.parse(/^result (.*)$/m.exec(stdout)?.[1] ?? "{}");
  const taskId = /^task (.*)$/m.exec(stdout)?.[1] ?? "";
  assert.deepEqual(result, { ticket: "42", agent: `spiffe://${TD}/agent/demo`, task: taskId });
  await using b = connect({ profile: broker.profile });
  assert.equal(
    (await b.attach(taskId)).info.state,
    "completed",
    "leaving the block completed the task",
  );
});

test("no token, a certificate-bound token and a revoked token are refused", async () => {
  const none = await fetch(resource, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: "{}",
  });
  assert.equal(none.status, 401);
  assert.match(none.headers.get("www-authenticate") ?? "", /^Bearer error="invalid_token"/);

  await using b = connect({ profile: broker.profile });
  const task = await b.startTask("mcp refusals", {
    audiences: [resource],
    scopes: ["read:tickets"],
  });
  const bound = await task.token(resource, ["read:tickets"]);
  const refused = await fetch(resource, {
    method: "POST",
    headers: { authorization: `Bearer ${bound.token.value}`, "content-type": "application/json" },
    body: "{}",
  });
  assert.equal(refused.status, 401);
  assert.match(
    refused.headers.get("www-authenticate") ?? "",
    /error_description="certificate_required"/,
  );

  const bearer = (await task.token(resource, ["read:tickets"], { bind: false })).token.value;
  const withToken = (url: string | URL, init?: RequestInit) => {
    const headers = new Headers(init?.headers);
    headers.set("authorization", `Bearer ${bearer}`);
    return fetch(url, { ...init, headers });
  };
  const c = await client(withToken);
  assert.deepEqual(
    (await c.listTools()).tools.map((t) => t.name),
    ["read_ticket"],
  );
  await c.close();
  await task.complete();
  await eventually("the revoked token is refused", async () => {
    const r = await withToken(resource, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: "{}",
    });
    return (
      r.status === 401 &&
      /error_description="revoked"/.test(r.headers.get("www-authenticate") ?? "")
    );
  });
});
