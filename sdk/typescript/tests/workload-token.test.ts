/**
 * Agents without a client certificate: a broker trusting a Kubernetes-style
 * issuer (`[[federation]]` with a `jwks_file` made here with jose), and
 * agents that connect with only its CA and a workload token, from a file or
 * a callback. Their tokens are bearer tokens whose `sub` is the mapped
 * SPIFFE ID; a token already used is renewed once from its source, and one
 * the source cannot renew is a typed refusal.
 */
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { inspect } from "node:util";
import { type CryptoKey, decodeJwt, exportJWK, generateKeyPair, SignJWT } from "jose";
import {
  ConfigError,
  connect,
  InvalidRequest,
  Unauthenticated,
  WorkloadToken,
} from "../src/index.js";
import { API, startBroker, type TestBroker } from "./broker.js";

const K8S = "https://kubernetes.default.svc.cluster.local";
const MAPPED = "spiffe://example.org/agent/prod/billing";
let broker: TestBroker;
let key: CryptoKey;
const dir = mkdtempSync(join(tmpdir(), "mayfly-k8s-"));

function issued(expIn = 600, jti = randomUUID()): Promise<string> {
  const now = Math.floor(Date.now() / 1000);
  return new SignJWT({ jti })
    .setProtectedHeader({ alg: "ES256", kid: "k8s-1" })
    .setIssuer(K8S)
    .setAudience([broker.issuer])
    .setSubject("system:serviceaccount:prod:billing")
    .setIssuedAt(now)
    .setNotBefore(now)
    .setExpirationTime(now + expIn)
    .sign(key);
}

before(async () => {
  const pair = await generateKeyPair("ES256");
  key = pair.privateKey;
  const jwk = { ...(await exportJWK(pair.publicKey)), kid: "k8s-1", alg: "ES256", use: "sig" };
  const jwks = join(dir, "k8s-jwks.json");
  writeFileSync(jwks, JSON.stringify({ keys: [jwk] }));
  broker = await startBroker({
    extra: `
[[federation]]
issuer = "${K8S}"
jwks_file = "${jwks}"
algorithms = ["ES256"]
subject = "system:serviceaccount:{ns}:{sa}"
spiffe_id = "spiffe://example.org/agent/{ns}/{sa}"
`,
  });
});
after(async () => {
  await broker.stop();
});

function withToken(source: WorkloadToken) {
  return connect({
    broker: broker.grpcUrl,
    ca: join(broker.profile, "bundle.pem"),
    workloadToken: source,
  });
}

test("a pod with a token file opens a task and gets a bearer token", async () => {
  const path = join(dir, "token");
  writeFileSync(path, `${await issued()}\n`);
  await using b = withToken(WorkloadToken.fromFile(path));
  await using task = await b.startTask("bill", { audiences: [API], scopes: ["read:invoices"] });
  assert.equal(task.info.agentId, MAPPED);
  const token = await task.token(API, ["read:invoices"]);
  const claims = decodeJwt(token.token.value);
  assert.equal(claims.sub, MAPPED);
  assert.equal(claims.cnf, undefined, "no certificate to bind to");
  await assert.rejects(task.token(API, ["read:invoices"], { bind: true }), InvalidRequest);
});

test("a token used on another connection is renewed once; one that cannot be is refused by name", async () => {
  const fetched: string[] = [];
  const source = WorkloadToken.fromCallback(async () => {
    fetched.push(await issued());
    return fetched.at(-1) ?? "";
  }, "test issuer");
  const owners: string[] = [];
  for (let i = 0; i < 2; i++) {
    await using b = withToken(source);
    const task = await b.startTask("bill", { audiences: [API], scopes: ["read:invoices"] });
    owners.push(task.info.agentId);
    await task.complete();
  }
  assert.deepEqual(owners, [MAPPED, MAPPED]);
  assert.equal(fetched.length, 2);
  assert.notEqual(fetched[0], fetched[1]);

  const used = fetched[0] ?? "";
  let asked = 0;
  const stuck = WorkloadToken.fromCallback(() => {
    asked += 1;
    return used;
  });
  await using b = withToken(stuck);
  await assert.rejects(
    b.startTask("bill", { audiences: [API], scopes: ["read:invoices"] }),
    (e) => {
      assert.ok(e instanceof Unauthenticated, String(e));
      assert.equal(e.error, "workload_token_used");
      return true;
    },
  );
  assert.equal(asked, 2);

  const expired = join(dir, "expired");
  writeFileSync(expired, await issued(-300));
  await using late = withToken(WorkloadToken.fromFile(expired));
  await assert.rejects(late.startTask("bill", { audiences: [API], scopes: ["read:invoices"] }), {
    name: "Unauthenticated",
    error: "workload_token_expired",
  });
});

test("a token and a certificate, a missing or empty file, are configuration errors; the token never shows", async () => {
  const agent = join(broker.profile, "identities", "agent-demo");
  const ca = join(broker.profile, "bundle.pem");
  assert.throws(
    () =>
      connect({
        broker: broker.grpcUrl,
        ca,
        cert: join(agent, "svid.pem"),
        key: join(agent, "svid.key"),
        workloadToken: WorkloadToken.fromCallback(() => "x"),
      }),
    /proves itself with one/,
  );
  assert.throws(() => WorkloadToken.fromFile(join(dir, "missing")), ConfigError);
  writeFileSync(join(dir, "empty"), "\n");
  assert.throws(() => WorkloadToken.fromFile(join(dir, "empty")), /is empty/);
  const token = WorkloadToken.fromCallback(() => "secret.value.here");
  await token.current();
  assert.ok(!inspect(token).includes("secret"));
  assert.ok(!JSON.stringify({ token }).includes("secret"));
});
