/**
 * An agent whose certificate comes from the SPIFFE Workload API. SPIRE is
 * not packaged here, so the test serves the public protocol itself, from
 * the SPIFFE Workload API spec and its workload.proto: FetchX509SVID as a
 * gRPC stream on a Unix socket, refusing a call without the
 * `workload.spiffe.io: true` header, and pushing a new SVID on rotation,
 * as an agent does.
 */
import assert from "node:assert/strict";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { mkdtempSync, readFileSync } from "node:fs";
import { createServer, type Http2Server } from "node:http2";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import {
  SpiffeWorkloadAPI,
  type X509SVID,
  X509SVIDResponseSchema,
  X509SVIDSchema,
} from "../src/gen/spiffe/workload_pb.js";
import { ConfigError, connect, WorkloadApi } from "../src/index.js";
import { AGENT, API, eventually, OTHER_AGENT, startBroker, type TestBroker } from "./broker.js";

let broker: TestBroker;
let server: Http2Server;
let socket = "";
let current: X509SVID;
let version = 0;
let refusedWithoutHeader = 0;

function der(pemText: string): Uint8Array {
  const blocks =
    pemText.match(/-----BEGIN CERTIFICATE-----[\s\S]*?-----END CERTIFICATE-----/g) ?? [];
  return Buffer.concat(blocks.map((b) => new X509Certificate(b).raw));
}

function svidOf(identity: string, spiffeId: string): X509SVID {
  const dir = join(broker.profile, "identities", identity);
  return create(X509SVIDSchema, {
    spiffeId,
    x509Svid: der(readFileSync(join(dir, "svid.pem"), "utf8")),
    x509SvidKey: createPrivateKey(readFileSync(join(dir, "svid.key"))).export({
      type: "pkcs8",
      format: "der",
    }),
    bundle: der(broker.caPem),
  });
}

before(async () => {
  broker = await startBroker();
  current = svidOf("agent-demo", AGENT);
  socket = join(mkdtempSync(join(tmpdir(), "mayfly-wl-")), "agent.sock");
  const adapter = connectNodeAdapter({
    routes: (router) =>
      router.service(SpiffeWorkloadAPI, {
        async *fetchX509SVID(_req, ctx) {
          if (ctx.requestHeader.get("workload.spiffe.io") !== "true") {
            refusedWithoutHeader += 1;
            throw new ConnectError("security header missing from request", Code.InvalidArgument);
          }
          let sent = -1;
          while (!ctx.signal.aborted) {
            if (sent !== version) {
              sent = version;
              yield create(X509SVIDResponseSchema, { svids: [current] });
            }
            await new Promise((r) => setTimeout(r, 20));
          }
        },
      }),
  });
  server = createServer(adapter);
  await new Promise<void>((r) => server.listen(socket, r));
});

after(async () => {
  server.close();
  await broker.stop();
});

test("an agent proves itself with the Workload API's SVID, and follows its rotation", async () => {
  await using source = await WorkloadApi.open(`unix://${socket}`);
  assert.equal(source.svid.spiffeId, AGENT);
  await using b = connect({ workloadApi: source, broker: broker.grpcUrl });
  const first = await b.startTask("from the workload api", {
    audiences: [API],
    scopes: ["read:tickets"],
  });
  assert.equal(first.info.agentId, AGENT);
  await first.complete();

  // The agent rotates to another SVID: new calls present it.
  current = svidOf("agent-bob", OTHER_AGENT);
  version += 1;
  await eventually("the rotated SVID is held", () => source.svid.spiffeId === OTHER_AGENT);
  const second = await b.startTask("after rotation", {
    audiences: [API],
    scopes: ["read:tickets"],
  });
  assert.equal(second.info.agentId, OTHER_AGENT);
  await second.complete();
  assert.equal(refusedWithoutHeader, 0);
});

test("an endpoint that is not a Unix socket, or sends nothing, is a ConfigError", async () => {
  await assert.rejects(WorkloadApi.open("tcp://127.0.0.1:1"), ConfigError);
  await assert.rejects(WorkloadApi.open(`unix://${socket}.missing`, 2000), ConfigError);
});
