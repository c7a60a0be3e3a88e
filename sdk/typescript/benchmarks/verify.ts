/**
 * `Verifier.verify` per second next to a bare `jose.jwtVerify` of the same
 * token with the same key, in the same process and the same run (rounds
 * interleaved), and how long after `CompleteTask` returns the verifier
 * (following the feed) refuses the task's token.
 *
 *     node dist/benchmarks/verify.js --profile .mayfly-dev [--identity api-tickets]
 *
 * The identity follows the feed (it must be one the broker lets watch).
 */

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { performance } from "node:perf_hooks";
import { parseArgs } from "node:util";
import { createLocalJWKSet, jwtVerify } from "jose";
import { connect } from "../src/index.js";
import { httpsGet } from "../src/verify/http.js";
import { feedFromProfile, Verifier } from "../src/verify/index.js";

const { values } = parseArgs({
  options: {
    profile: { type: "string", default: ".mayfly-dev" },
    identity: { type: "string", default: "api-tickets" },
    issuer: { type: "string", default: "https://localhost:8711" },
    audience: { type: "string", default: "https://api.example.com" },
    n: { type: "string", default: "20000" },
    rounds: { type: "string", default: "3" },
    revocations: { type: "string", default: "50" },
  },
});
const profile = values.profile ?? ".mayfly-dev";
const issuer = values.issuer ?? "https://localhost:8711";
const audience = values.audience ?? "https://api.example.com";
const n = Number(values.n);
const ca = readFileSync(join(profile, "bundle.pem"), "utf8");

await using broker = connect({ profile });
const verifier = new Verifier({
  issuer,
  audience,
  ca,
  feed: feedFromProfile(profile, values.identity ?? "api-tickets"),
});
if (!(await verifier.waitForFeed(30_000))) throw new Error("the feed did not answer");
const jwks = await httpsGet(`${issuer}/.well-known/jwks.json`, {
  ca,
  accept: "application/json",
  maxBytes: 1 << 20,
  timeoutMs: 5000,
});
const keys = createLocalJWKSet(JSON.parse(jwks.body.toString()));

await using task = await broker.startTask("bench", {
  audiences: [audience],
  scopes: ["read:tickets"],
});
const token = (await task.token(audience, ["read:tickets"], { bind: false })).token.value;

async function rate(f: () => Promise<unknown>): Promise<number> {
  const start = performance.now();
  for (let i = 0; i < n; i++) {
    await f();
  }
  return n / ((performance.now() - start) / 1000);
}
const bare = () =>
  jwtVerify(token, keys, { issuer, audience, typ: "at+jwt", algorithms: ["ES256", "EdDSA"] });
const full = () => verifier.verify(token);
await rate(bare);
await rate(full);
console.log("round\tVerifier.verify/s\tbare jose.jwtVerify/s\tratio");
for (let r = 0; r < Number(values.rounds); r++) {
  const v = await rate(full);
  const j = await rate(bare);
  console.log(`${r}\t${v.toFixed(0)}\t${j.toFixed(0)}\t${(v / j).toFixed(2)}`);
}

// Revoke to refused: complete a task, then verify its token every 0.5 ms.
const delays: number[] = [];
for (let i = 0; i < Number(values.revocations); i++) {
  const t = await broker.startTask("revoke", { audiences: [audience], scopes: ["read:tickets"] });
  const tok = (await t.token(audience, ["read:tickets"], { bind: false })).token.value;
  await verifier.verify(tok);
  await t.complete();
  const done = performance.now();
  for (;;) {
    try {
      await verifier.verify(tok);
      await new Promise((r) => setTimeout(r, 0.5));
    } catch {
      delays.push(performance.now() - done);
      break;
    }
  }
}
delays.sort((a, b) => a - b);
const pct = (p: number) =>
  delays[Math.min(delays.length - 1, Math.floor((p / 100) * delays.length))] ?? 0;
console.log(
  `CompleteTask returned -> refused (${delays.length} runs): p50 ${pct(50).toFixed(1)} ms, p99 ${pct(99).toFixed(1)} ms, max ${pct(100).toFixed(1)} ms`,
);
verifier.close();
