/**
 * The agent's side against a real broker: a task block's token accepted by
 * a stock validator (bare jose), tasks completed however their block ends,
 * typed refusals, approvals decided by an operator through the CLI, DPoP,
 * certificates checked with openssl, context changes and delegation.
 */
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createPrivateKey, X509Certificate } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { createServer } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { inspect } from "node:util";
import { createLocalJWKSet, decodeJwt, jwtVerify } from "jose";
import {
  ApprovalDenied,
  ApprovalRequired,
  BrokerError,
  ConfigError,
  connect,
  DpopKey,
  NoAudience,
  OutsideEnvelope,
  PolicyDenied,
  RateLimited,
  TaskEnded,
  Unavailable,
} from "../src/index.js";
import { httpsGet } from "../src/verify/http.js";
import {
  AGENT,
  API,
  eventually,
  freePort,
  OTHER_AGENT,
  readPolicy,
  startBroker,
  type TestBroker,
} from "./broker.js";

const TOOLS = "https://tools.example.com";

let broker: TestBroker;
/** A plain HTTP service the agents' tasks may name as an audience. */
let local = "";

before(async () => {
  local = `http://127.0.0.1:${await freePort()}/api`;
  broker = await startBroker({ policies: readPolicy("local-api", local) });
});
after(async () => {
  await broker.stop();
});

function agent(identity?: string) {
  return connect({ profile: broker.profile, ...(identity ? { identity } : {}) });
}

async function stateOf(taskId: string): Promise<string> {
  await using b = agent();
  return (await b.attach(taskId)).info.state;
}

describe("a task block", () => {
  test("yields a token a bare jose validator accepts, and completes the task when left", async () => {
    let taskId = "";
    let jwt = "";
    {
      await using b = agent();
      await using task = await b.startTask("summarise ticket 42", {
        audiences: [API],
        scopes: ["read:tickets"],
        context: { environment: "staging" },
      });
      taskId = task.taskId;
      const token = await task.token(API, ["read:tickets"]);
      jwt = token.token.value;
      assert.deepEqual(token.scopes, ["read:tickets"]);
      assert.equal(task.info.state, "active");
    }
    // jose alone: the JWKS over the broker's TLS, the RFC 9068 checks.
    const jwks = await httpsGet(`${broker.issuer}/.well-known/jwks.json`, {
      ca: broker.caPem,
      accept: "application/json",
      maxBytes: 1 << 20,
      timeoutMs: 5000,
    });
    const { payload, protectedHeader } = await jwtVerify(
      jwt,
      createLocalJWKSet(JSON.parse(jwks.body.toString())),
      { issuer: broker.issuer, audience: API, typ: "at+jwt", algorithms: ["ES256", "EdDSA"] },
    );
    assert.equal(protectedHeader.typ, "at+jwt");
    assert.equal(payload.sub, AGENT);
    assert.equal(payload.task_id, taskId);
    assert.equal(payload.scope, "read:tickets");
    assert.equal(await stateOf(taskId), "completed");
  });

  test("completes the task when its body throws, and the error is the body's", async () => {
    let taskId = "";
    await assert.rejects(
      (async () => {
        await using b = agent();
        await using task = await b.startTask("fails midway", {
          audiences: [API],
          scopes: ["read:tickets"],
        });
        taskId = task.taskId;
        throw new Error("the tool crashed");
      })(),
      /the tool crashed/,
    );
    assert.equal(await stateOf(taskId), "completed");

    // The callback form does the same.
    await using b = agent();
    let inner = "";
    await assert.rejects(
      b.withTask("fails too", { audiences: [API], scopes: ["read:tickets"] }, async (task) => {
        inner = task.taskId;
        throw new TypeError("bad plan");
      }),
      TypeError,
    );
    assert.equal(await stateOf(inner), "completed");
    const ok = await b.withTask(
      "works",
      { audiences: [API], scopes: ["read:tickets"] },
      async (task) => task.taskId,
    );
    assert.equal(await stateOf(ok), "completed");
  });

  test("caches a token per audience, scopes and binding, and forgets it when told", async () => {
    await using b = agent();
    await using task = await b.startTask("cache", {
      audiences: [API],
      scopes: ["read:tickets", "write:tickets"],
    });
    const [one, two] = await Promise.all([
      task.token(API, ["read:tickets"]),
      task.token(API, ["read:tickets"]),
    ]);
    assert.equal(one, two, "concurrent callers share one request");
    assert.equal(await task.token(API, ["read:tickets"]), one);
    const bearer = await task.token(API, ["read:tickets"], { bind: false });
    assert.notEqual(bearer.leaseId, one.leaseId);
    assert.equal(decodeJwt(bearer.token.value).cnf, undefined);
    assert.ok((decodeJwt(one.token.value).cnf as Record<string, string>)["x5t#S256"]);
    task.forget(one.leaseId);
    assert.notEqual((await task.token(API, ["read:tickets"])).leaseId, one.leaseId);
  });

  test("never shows a secret in inspect or JSON", async () => {
    await using b = agent();
    await using task = await b.startTask("secrets", { audiences: [API], scopes: ["read:tickets"] });
    const token = await task.token(API, ["read:tickets"]);
    const cert = await task.certificate();
    for (const shown of [
      inspect(token, { depth: 5 }),
      JSON.stringify(token),
      inspect(cert),
      JSON.stringify(cert),
      inspect(b.connection),
    ]) {
      assert.ok(!shown.includes(token.token.value.slice(0, 40)), shown);
      assert.ok(!shown.includes("PRIVATE KEY"), shown);
    }
  });
});

describe("typed refusals", () => {
  test("a scope outside the envelope", async () => {
    await using b = agent();
    await using task = await b.startTask("envelope", {
      audiences: [API],
      scopes: ["read:tickets"],
    });
    await assert.rejects(task.token(API, ["export:tickets"]), (e) => {
      assert.ok(e instanceof OutsideEnvelope);
      assert.equal(e.code, "PERMISSION_DENIED");
      assert.equal(e.error, "outside_envelope");
      return true;
    });
  });

  test("a policy's denial names the policy", async () => {
    await using b = agent();
    await assert.rejects(
      b.startTask("export", {
        audiences: [API],
        scopes: ["export:customers"],
        context: { data_sensitivity: "restricted" },
      }),
      (e) => {
        assert.ok(e instanceof PolicyDenied, String(e));
        assert.equal(e.policyId, "dev-no-export-of-restricted-data");
        return true;
      },
    );
  });

  test("an ended task", async () => {
    await using b = agent();
    const task = await b.startTask("ends", { audiences: [API], scopes: ["read:tickets"] });
    const revoked = await task.complete();
    assert.ok(revoked.length >= 1);
    assert.deepEqual(await task.complete(), [], "completing again does nothing");
    await assert.rejects(task.token(API, ["read:tickets"]), TaskEnded);
  });

  test("another agent's task is not found", async () => {
    await using mine = agent();
    await using task = await mine.startTask("mine", { audiences: [API], scopes: ["read:tickets"] });
    await using theirs = agent("agent-bob");
    await assert.rejects(theirs.attach(task.taskId), { name: "NotFound" });
  });

  test("a rate limit says when to retry", async () => {
    const limited = await startBroker({ extra: "[rate_limit]\nper_second = 0.5\nburst = 2.0\n" });
    try {
      await using b = connect({ profile: limited.profile });
      await using task = await b.startTask("read", { audiences: [API, TOOLS], scopes: ["read:t"] });
      await task.token(API, ["read:t"], { bind: false });
      await task.token(API, ["read:t"], { bind: true });
      await assert.rejects(task.token(TOOLS, ["read:t"]), (e) => {
        assert.ok(e instanceof RateLimited, String(e));
        assert.ok(e.retryAfter >= 1);
        assert.equal(e.code, "RESOURCE_EXHAUSTED");
        return true;
      });
    } finally {
      await limited.stop();
    }
  });

  test("a broker that is down is Unavailable", async () => {
    await using b = connect({
      broker: `https://localhost:${await freePort()}`,
      ca: join(broker.profile, "bundle.pem"),
      cert: join(broker.profile, "identities", "agent-demo", "svid.pem"),
      key: join(broker.profile, "identities", "agent-demo", "svid.key"),
    });
    await assert.rejects(b.startTask("read", { audiences: [API], scopes: ["read:t"] }), (e) => {
      assert.ok(e instanceof Unavailable, String(e));
      assert.equal(e.code, "UNAVAILABLE");
      return true;
    });
  });

  test("a connection that cannot be made says why", () => {
    assert.throws(() => connect({ profile: join(tmpdir(), "no-such-profile") }), ConfigError);
    assert.throws(
      () => connect({ profile: broker.profile, identity: "nobody" }),
      /identity "nobody" not found/,
    );
    assert.throws(
      () => connect({ broker: "http://localhost:1", ca: "x", cert: "y", key: "z" }),
      ConfigError,
    );
  });
});

describe("approvals", () => {
  const production = {
    audiences: [API],
    scopes: ["read:tickets", "write:tickets"],
    context: { environment: "production" },
  };

  function pendingApprovals(): { approval_id: string; task_id: string }[] {
    return broker.cliJson("approval", "list");
  }

  /** The id of `taskId`'s approval, once `mayfly approval list` shows it. */
  async function listedApproval(taskId: string): Promise<string> {
    let id = "";
    await eventually("the approval is listed", () => {
      id = pendingApprovals().find((a) => a.task_id === taskId)?.approval_id ?? "";
      return id !== "";
    });
    return id;
  }

  test("a pending approval resolves after `mayfly approval approve`", async () => {
    await using b = agent();
    await using task = await b.startTask("fix ticket 42", production);
    const pending = await task.token(API, ["write:tickets"]).then(
      () => assert.fail("issued without approval"),
      (e: unknown) => {
        assert.ok(e instanceof ApprovalRequired, String(e));
        return e.approval;
      },
    );
    assert.equal(pending.policyId, "dev-write-production");
    assert.equal(pending.state, "pending");
    assert.deepEqual(
      pendingApprovals()
        .filter((a) => a.task_id === task.taskId)
        .map((a) => a.approval_id),
      [pending.approvalId],
    );
    const decided = b.waitForApproval(pending.approvalId, 60);
    broker.cli("approval", "approve", pending.approvalId, "--reason", "CHG-1042");
    const approved = await decided;
    assert.equal(approved.state, "approved");
    assert.equal(approved.reason, "CHG-1042");
    const token = await task.token(API, ["write:tickets"], { approvalId: pending.approvalId });
    assert.equal(decodeJwt(token.token.value).scope, "write:tickets");
    // Single use: the same approval a second time is refused.
    await assert.rejects(
      task.token(API, ["write:tickets"], { approvalId: pending.approvalId }),
      (e) => {
        assert.ok(e instanceof BrokerError, String(e));
        assert.equal(e.code, "FAILED_PRECONDITION");
        assert.match(e.error, /^approval_/);
        return true;
      },
    );
  });

  test("waitForApproval collects the token once an operator approves", async () => {
    await using b = agent();
    await using task = await b.startTask("fix ticket 44", production);
    const waiting = task.token(API, ["write:tickets"], { waitForApproval: 60 });
    const id = await listedApproval(task.taskId);
    broker.cli("approval", "approve", id);
    assert.deepEqual((await waiting).scopes, ["write:tickets"]);
  });

  test("a denied approval is ApprovalDenied with the operator's reason", async () => {
    await using b = agent();
    await using task = await b.startTask("fix ticket 43", production);
    const waiting = task.token(API, ["write:tickets"], { waitForApproval: 60 });
    const id = await listedApproval(task.taskId);
    broker.cli("approval", "deny", id, "--reason", "not today");
    await assert.rejects(waiting, (e) => {
      assert.ok(e instanceof ApprovalDenied, String(e));
      assert.equal(e.approvalId, id);
      assert.equal(e.reason, "not today");
      return true;
    });
  });
});

describe("credentials", () => {
  test("a DPoP-bound token names the key's thumbprint", async () => {
    await using b = agent();
    await using task = await b.startTask("dpop", { audiences: [API], scopes: ["read:tickets"] });
    const key = await DpopKey.generate();
    const token = await task.token(API, ["read:tickets"], { dpop: key });
    assert.equal(token.tokenType, "DPoP");
    assert.deepEqual(decodeJwt(token.token.value).cnf, { jkt: key.jkt });
  });

  test("a certificate for the task, made from a local key, verifies with openssl", async () => {
    await using b = agent();
    await using task = await b.startTask("cert", { audiences: [API], scopes: ["read:tickets"] });
    const cert = await task.certificate({ ttlSeconds: 300 });
    const x = new X509Certificate(cert.certificatePem);
    assert.equal(x.subjectAltName, `URI:${AGENT}/task/${task.taskId}`);
    assert.ok(x.checkPrivateKey(createPrivateKey(cert.keyPem.value)));
    assert.equal(x.serialNumber.toUpperCase(), cert.serial.toUpperCase());
    const dir = mkdtempSync(join(tmpdir(), "mayfly-cert-"));
    writeFileSync(join(dir, "leaf.pem"), cert.certificatePem);
    writeFileSync(join(dir, "chain.pem"), cert.chainPem);
    const out = execFileSync(
      "openssl",
      [
        "verify",
        "-CAfile",
        join(broker.profile, "bundle.pem"),
        "-untrusted",
        join(dir, "chain.pem"),
        join(dir, "leaf.pem"),
      ],
      { encoding: "utf8" },
    );
    assert.match(out, /leaf\.pem: OK/);
  });

  test("a context change revokes what policy no longer allows", async () => {
    await using b = agent();
    await using task = await b.startTask("context", {
      audiences: [API],
      scopes: ["read:tickets", "write:tickets"],
      context: { environment: "staging" },
    });
    const write = await task.token(API, ["write:tickets"]);
    const read = await task.token(API, ["read:tickets"]);
    const revoked = await task.updateContext({ set: { environment: "production" } });
    assert.deepEqual(revoked, [write.leaseId]);
    assert.equal(task.info.context.environment, "production");
    assert.equal(await task.token(API, ["read:tickets"]), read, "the read token stays cached");
  });

  test("a delegated task is taken up by its delegate and ends with its parent", async () => {
    await using b = agent();
    const parent = await b.startTask("parent", { audiences: [API], scopes: ["read:tickets"] });
    const child = await parent.delegate(OTHER_AGENT, {
      intent: "read for me",
      audiences: [API],
      scopes: ["read:tickets"],
    });
    assert.equal(child.parentTaskId, parent.taskId);
    await using bob = agent("agent-bob");
    const taken = await bob.attach(child.taskId);
    const token = await taken.token(API, ["read:tickets"]);
    assert.equal((decodeJwt(token.token.value).act as { sub: string }).sub, OTHER_AGENT);
    await parent.complete();
    assert.equal((await taken.refresh()).state, "revoked");
  });

  test("fetch sends the token to its audience, and never follows a redirect away from it", async () => {
    const seen: { path: string; authorization: string | undefined }[] = [];
    const server = createServer((req, res) => {
      seen.push({ path: req.url ?? "", authorization: req.headers.authorization });
      if (req.url === "/api/moved") {
        res.writeHead(302, { location: "/admin/secrets" }).end();
      } else {
        res.writeHead(200, { "content-type": "text/plain" }).end("ok");
      }
    });
    const port = Number(new URL(local).port);
    await new Promise<void>((r) => server.listen(port, "127.0.0.1", r));
    try {
      await using b = agent();
      await using task = await b.startTask("local", {
        audiences: [local],
        scopes: ["read:things"],
      });
      const ok = await task.fetch(`${local}/things?page=2`, {}, { bind: false });
      assert.equal(ok.status, 200);
      assert.match(seen[0]?.authorization ?? "", /^Bearer eyJ/);
      const moved = await task.fetch(`${local}/moved`, {}, { bind: false });
      assert.equal(moved.status, 302);
      assert.deepEqual(
        seen.map((s) => s.path),
        ["/api/things?page=2", "/api/moved"],
        "the redirect was not followed",
      );
      await assert.rejects(task.fetch("http://127.0.0.1:1/api/things"), NoAudience);
      await assert.rejects(task.fetch(`${local}x/things`), NoAudience);
    } finally {
      server.close();
    }
  });

  test("fetch sends a token only under the task's audiences", async () => {
    await using b = agent();
    await using task = await b.startTask("fetch", { audiences: [API], scopes: ["read:tickets"] });
    await assert.rejects(task.fetch("https://evil.example.net/steal"), NoAudience);
    await assert.rejects(task.fetch("https://api.example.com.evil.net/"), NoAudience);
  });
});
