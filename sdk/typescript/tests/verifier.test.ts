/**
 * The service's side against a real broker: the Verifier's refusals (a
 * revoked token via the feed and via the status lists, a DPoP-bound token as
 * Bearer, a replayed proof, alg none and HS256 keyed with the public key, a
 * stale feed, a foreign certificate), and the middleware for Express, Hono
 * and fetch handlers answering as RFC 6750 says.
 */
import assert from "node:assert/strict";
import { readFileSync, writeFileSync } from "node:fs";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import express from "express";
import { Hono } from "hono";
import { base64url, decodeJwt, SignJWT } from "jose";
import { connect, DpopKey, type Task, VerifyError } from "../src/index.js";
import { httpsGet } from "../src/verify/http.js";
import {
  expressMiddleware,
  feedFromProfile,
  honoMiddleware,
  type VerifiedToken,
  Verifier,
  withToken,
} from "../src/verify/index.js";
import { API, eventually, startBroker, type TestBroker } from "./broker.js";

let broker: TestBroker;
let verifier: Verifier;

before(async () => {
  broker = await startBroker();
  verifier = new Verifier({
    issuer: broker.issuer,
    audience: API,
    ca: broker.caPem,
    feed: feedFromProfile(broker.profile, "api-tickets"),
  });
  assert.ok(await verifier.waitForFeed(30_000), "the feed replayed");
});
after(async () => {
  verifier.close();
  await broker.stop();
});

async function withTask<T>(body: (task: Task) => Promise<T>): Promise<T> {
  await using b = connect({ profile: broker.profile });
  return await b.withTask("verify", { audiences: [API], scopes: ["read:tickets"] }, body);
}

/** Verifies `token` with `v` until it is refused; the refusal. */
async function untilRefused(
  v: Verifier,
  token: string,
  what: string,
  timeoutMs?: number,
): Promise<VerifyError> {
  let refused: VerifyError | undefined;
  await eventually(
    what,
    async () => {
      try {
        await v.verify(token);
        return false;
      } catch (e) {
        assert.ok(e instanceof VerifyError, String(e));
        refused = e;
        return true;
      }
    },
    timeoutMs,
  );
  assert.ok(refused);
  return refused;
}

async function refusal(p: Promise<unknown>): Promise<VerifyError> {
  try {
    await p;
  } catch (e) {
    assert.ok(e instanceof VerifyError, String(e));
    return e;
  }
  assert.fail("the token was accepted");
}

describe("Verifier", () => {
  test("accepts a live token and refuses it once its task completes (the feed)", async () => {
    await using b = connect({ profile: broker.profile });
    const task = await b.startTask("revoke", { audiences: [API], scopes: ["read:tickets"] });
    const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
    const ok = await verifier.verify(token);
    assert.equal(ok.taskId, task.taskId);
    assert.deepEqual(ok.scopes, ["read:tickets"]);
    await task.complete();
    const refused = await untilRefused(verifier, token, "the feed delivers the revocation");
    assert.equal(refused.check, "revoked");
  });

  test("refuses a DPoP-bound token sent as Bearer, and a replayed proof", async () => {
    await withTask(async (task) => {
      const key = await DpopKey.generate();
      const token = (await task.token(API, ["read:tickets"], { dpop: key })).token.value;
      assert.equal((await refusal(verifier.verify(token))).check, "dpop_required");
      const url = `${API}/tickets/42`;
      const proof = await key.proof("GET", url, token);
      const ok = await verifier.verify(token, { dpop: { proof, method: "GET", url } });
      assert.equal(ok.dpopKey, key.jkt);
      const replay = await refusal(verifier.verify(token, { dpop: { proof, method: "GET", url } }));
      assert.equal(replay.check, "dpop_replayed");
      const elsewhere = await key.proof("GET", `${API}/tickets/43`, token);
      const moved = await refusal(
        verifier.verify(token, { dpop: { proof: elsewhere, method: "GET", url } }),
      );
      assert.equal(moved.check, "dpop_url");
      const other = await DpopKey.generate();
      const stolen = await other.proof("GET", url, token);
      assert.equal(
        (await refusal(verifier.verify(token, { dpop: { proof: stolen, method: "GET", url } })))
          .check,
        "dpop_wrong_key",
      );
    });
  });

  test("refuses alg none and HS256 keyed with the issuer's public key", async () => {
    await withTask(async (task) => {
      const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
      const [, payload] = token.split(".");
      const claims = decodeJwt(token);
      const none = `${base64url.encode(JSON.stringify({ alg: "none", typ: "at+jwt" }))}.${payload}.`;
      assert.equal((await refusal(verifier.verify(none))).check, "algorithm");
      // The classic confusion: HMAC keyed with the issuer's public key, as published.
      const kid = JSON.parse(Buffer.from(token.split(".")[0] ?? "", "base64url").toString()).kid;
      const jwks = await httpsGet(`${broker.issuer}/.well-known/jwks.json`, {
        ca: broker.caPem,
        accept: "application/json",
        maxBytes: 1 << 20,
        timeoutMs: 5000,
      });
      const published = (JSON.parse(jwks.body.toString()) as { keys: { kid: string }[] }).keys.find(
        (k) => k.kid === kid,
      );
      assert.ok(published, "the token's key is published");
      const hs = await new SignJWT(claims)
        .setProtectedHeader({ alg: "HS256", typ: "at+jwt", kid })
        .sign(new TextEncoder().encode(JSON.stringify(published)));
      assert.equal((await refusal(verifier.verify(hs))).check, "algorithm");
      // A signature that is not the issuer's.
      const forged = `${token.slice(0, token.lastIndexOf("."))}.${base64url.encode(new Uint8Array(64))}`;
      assert.equal((await refusal(verifier.verify(forged))).check, "bad_signature");
    });
  });

  test("refuses a token for another audience, and a certificate-bound one without its certificate", async () => {
    await withTask(async (task) => {
      const bound = (await task.token(API, ["read:tickets"])).token.value;
      assert.equal((await refusal(verifier.verify(bound))).check, "certificate_required");
      const agentCert = readFileSync(
        join(broker.profile, "identities", "agent-demo", "svid.pem"),
        "utf8",
      );
      assert.equal(
        (await verifier.verify(bound, { clientCert: agentCert })).agent,
        "spiffe://example.org/agent/demo",
      );
      const otherCert = readFileSync(
        join(broker.profile, "identities", "agent-bob", "svid.pem"),
        "utf8",
      );
      assert.equal(
        (await refusal(verifier.verify(bound, { clientCert: otherCert }))).check,
        "certificate_mismatch",
      );
      const elsewhere = new Verifier({
        issuer: broker.issuer,
        audience: "https://other.example.com",
        ca: broker.caPem,
      });
      const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
      assert.equal((await refusal(elsewhere.verify(token))).check, "wrong_audience");
      elsewhere.close();
    });
  });
});

describe("middleware", () => {
  async function serve(app: express.Express): Promise<[string, () => void]> {
    const server = app.listen(0, "127.0.0.1");
    await new Promise((r) => server.once("listening", r));
    const { port } = server.address() as AddressInfo;
    return [`http://127.0.0.1:${port}`, () => server.close()];
  }

  test("Express answers 401, 403 and 200 as RFC 6750 says", async () => {
    const app = express();
    app.get(
      "/tickets/:id",
      expressMiddleware(verifier, { scopes: ["read:tickets"] }),
      (req, res) => {
        const t = res.locals.mayfly as VerifiedToken;
        res.json({ ticket: req.params.id, task: t.taskId });
      },
    );
    app.get("/admin", expressMiddleware(verifier, { scopes: ["admin"] }), (_req, res) => {
      res.json({});
    });
    const [base, close] = await serve(app);
    try {
      const none = await fetch(`${base}/tickets/42`);
      assert.equal(none.status, 401);
      assert.equal(
        none.headers.get("www-authenticate"),
        'Bearer realm="mayfly", DPoP algs="ES256 EdDSA"',
      );
      await withTask(async (task) => {
        const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
        const ok = await fetch(`${base}/tickets/42`, {
          headers: { authorization: `Bearer ${token}` },
        });
        assert.equal(ok.status, 200);
        assert.deepEqual(await ok.json(), { ticket: "42", task: task.taskId });
        const scope = await fetch(`${base}/admin`, {
          headers: { authorization: `Bearer ${token}` },
        });
        assert.equal(scope.status, 403);
        assert.match(scope.headers.get("www-authenticate") ?? "", /error="insufficient_scope"/);
        await task.complete();
        await eventually("the revoked token is refused", async () => {
          const r = await fetch(`${base}/tickets/42`, {
            headers: { authorization: `Bearer ${token}` },
          });
          return (
            r.status === 401 &&
            /error_description="revoked"/.test(r.headers.get("www-authenticate") ?? "")
          );
        });
      });
    } finally {
      close();
    }
  });

  test("a DPoP request through Task.fetch passes Hono and fetch handlers; a forged one does not", async () => {
    const key = await DpopKey.generate();
    const app = new Hono<{ Variables: { mayfly: VerifiedToken } }>();
    app.use("/tickets/*", honoMiddleware(verifier, { scopes: ["read:tickets"] }));
    app.get("/tickets/:id", (c) =>
      c.json({ ticket: c.req.param("id"), agent: c.get("mayfly").agent }),
    );
    const handler = withToken(verifier, (_req, t) => Response.json({ lease: t.leaseId }));
    await withTask(async (task) => {
      const token = (await task.token(API, ["read:tickets"], { dpop: key })).token.value;
      const url = `${API}/tickets/7`;
      const proof = await key.proof("GET", url, token);
      const ok = await app.request(
        new Request(url, { headers: { authorization: `DPoP ${token}`, dpop: proof } }),
      );
      assert.equal(ok.status, 200);
      assert.deepEqual(await ok.json(), { ticket: "7", agent: "spiffe://example.org/agent/demo" });
      const again = await app.request(
        new Request(url, { headers: { authorization: `DPoP ${token}`, dpop: proof } }),
      );
      assert.equal(again.status, 401);
      assert.match(
        again.headers.get("www-authenticate") ?? "",
        /error="invalid_dpop_proof", error_description="dpop_replayed"/,
      );
      // The DPoP scheme with an empty proof header is no proof at all.
      const empty = await app.request(
        new Request(url, { headers: { authorization: `DPoP ${token}`, dpop: "" } }),
      );
      assert.equal(empty.status, 401);
      assert.match(
        empty.headers.get("www-authenticate") ?? "",
        /^DPoP realm="mayfly", error="invalid_dpop_proof", error_description="DPoP proof missing"/,
      );
      const bearer = await handler(
        new Request(url, { headers: { authorization: `Bearer ${token}` } }),
      );
      assert.equal(bearer.status, 401);
      assert.match(bearer.headers.get("www-authenticate") ?? "", /dpop_required/);
      const fresh = await key.proof("GET", url, token);
      const lease = await handler(
        new Request(url, { headers: { authorization: `DPoP ${token}`, dpop: fresh } }),
      );
      assert.equal(lease.status, 200);
    });
  });
});

describe("failing closed", () => {
  test("a stale feed refuses every token, and recovers when the broker is back", async () => {
    const own = await startBroker();
    const v = new Verifier({
      issuer: own.issuer,
      audience: API,
      ca: own.caPem,
      feed: feedFromProfile(own.profile, "api-tickets", 1),
    });
    try {
      assert.ok(await v.waitForFeed(30_000));
      await using b = connect({ profile: own.profile });
      const task = await b.startTask("stale", {
        audiences: [API],
        scopes: ["read:tickets"],
        ttlSeconds: 600,
      });
      const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
      await v.verify(token);
      await own.stop();
      const stale = await untilRefused(v, token, "the feed is stale");
      assert.equal(stale.check, "feed_stale");
      assert.ok(stale.serverSide);
      await own.start();
      await eventually(
        "the feed is back",
        async () => {
          try {
            await v.verify(token);
            return true;
          } catch {
            return false;
          }
        },
        30_000,
      );
    } finally {
      v.close();
      await own.stop();
    }
  });

  test("Token Status Lists: a revocation shows within the list's ttl, and a list that cannot be had refuses", async () => {
    const own = await startBroker({});
    const config = readFileSync(own.config, "utf8");
    assert.ok(config.includes("[tokens]\n"), "the dev configuration has a [tokens] table");
    await own.stop();
    writeFileSync(own.config, config.replace("[tokens]\n", '[tokens]\nstatus_list_ttl = "1s"\n'));
    await own.start();
    const v = new Verifier({ issuer: own.issuer, audience: API, ca: own.caPem, statusLists: true });
    try {
      await using b = connect({ profile: own.profile });
      const task = await b.startTask("listed", { audiences: [API], scopes: ["read:tickets"] });
      const token = (await task.token(API, ["read:tickets"], { bind: false })).token.value;
      const status = decodeJwt(token).status as { status_list: { uri: string; idx: number } };
      assert.ok(status.status_list.uri.startsWith(`${own.issuer}/statuslists/`));
      await v.verify(token);
      await task.complete();
      assert.equal((await untilRefused(v, token, "the list marks the token")).check, "revoked");
      const other = await b.startTask("listed 2", { audiences: [API], scopes: ["read:tickets"] });
      const live = (await other.token(API, ["read:tickets"], { bind: false })).token.value;
      await v.verify(live);
      await own.stop();
      const old = await untilRefused(v, live, "the held list is too old to use");
      assert.equal(old.check, "status_unavailable");
      assert.ok(old.serverSide);
    } finally {
      v.close();
      await own.stop();
    }
  });
});
