/** The SDK's pure parts, on their edge cases: what an attacker would try against them. */
import assert from "node:assert/strict";
import { test } from "node:test";
import { audienceFor, stillFresh } from "../src/client.js";
import { VerifyError } from "../src/errors.js";
import { binding, normUrl } from "../src/verify/verifier.js";
import { certificatesPem, socketPath } from "../src/workload-api.js";

test("audienceFor takes the longest audience on a path boundary of the same origin", () => {
  const auds = [
    "https://api.example.com",
    "https://api.example.com/v2",
    "http://127.0.0.1:8080/api",
  ];
  assert.equal(audienceFor("https://api.example.com/v2/x", auds), "https://api.example.com/v2");
  assert.equal(audienceFor("https://api.example.com/v20", auds), "https://api.example.com");
  assert.equal(audienceFor("https://api.example.com.evil.net/v2", auds), undefined);
  assert.equal(audienceFor("http://api.example.com/", auds), undefined, "another scheme");
  assert.equal(audienceFor("https://api.example.com:8443/", auds), undefined, "another port");
  assert.equal(audienceFor("http://127.0.0.1:8080/apix", auds), undefined);
  assert.equal(audienceFor("http://127.0.0.1:8080/api/x", auds), "http://127.0.0.1:8080/api");
  assert.equal(audienceFor("https://user@api.example.com/", ["postgres://orders"]), undefined);
});

test("a cached token is renewed once a fifth of its life (at most 30 s) is left", () => {
  const issued = 0;
  const tenMinutes = new Date(600_000);
  assert.ok(stillFresh(tenMinutes, issued, 569_000));
  assert.ok(!stillFresh(tenMinutes, issued, 571_000));
  const tenSeconds = new Date(10_000);
  assert.ok(stillFresh(tenSeconds, issued, 7_900));
  assert.ok(!stillFresh(tenSeconds, issued, 8_100));
});

test("DPoP htu is compared as the other verifiers compare it", () => {
  assert.equal(normUrl("HTTPS://API.Example.com:443/a/b?q=1#f"), "https://api.example.com/a/b");
  assert.equal(normUrl("http://h:80"), "http://h/");
  assert.notEqual(
    normUrl("https://h/a/../admin"),
    normUrl("https://h/admin"),
    "no dot segments resolved",
  );
  assert.notEqual(normUrl("https://h/%61"), normUrl("https://h/a"), "nothing re-encoded");
  assert.notEqual(normUrl("https://h:8443/a"), normUrl("https://h/a"));
});

test("a cnf member that is not a thumbprint is refused, never read as unbound", () => {
  assert.deepEqual(binding(undefined), [undefined, undefined]);
  assert.deepEqual(binding({ jkt: "abc" }), [undefined, "abc"]);
  assert.deepEqual(binding({ "x5t#S256": "xyz" }), ["xyz", undefined]);
  for (const bad of [{ jkt: 1 }, { jkt: "" }, { "x5t#S256": [] }, "jkt", null, [1]]) {
    assert.throws(
      () => binding(bad),
      (e) => e instanceof VerifyError && e.check === "malformed",
      JSON.stringify(bad),
    );
  }
});

test("Workload API certificates split from DER, and only unix endpoints", () => {
  const cert = (n: number) => Uint8Array.from([0x30, 0x82, 0x00, n, ...new Array(n).fill(7)]);
  const two = Uint8Array.from([...cert(3), ...cert(200)]);
  assert.equal((certificatesPem(two).match(/BEGIN CERTIFICATE/g) ?? []).length, 2);
  assert.throws(() => certificatesPem(Uint8Array.from([0x30, 0x82, 0x01, 0x00, 1])), /truncated/);
  assert.throws(() => certificatesPem(Uint8Array.from([0x04, 0x01, 0x00])), /not DER/);
  assert.equal(socketPath("unix:///run/spire/agent.sock"), "/run/spire/agent.sock");
  assert.equal(socketPath("unix:/tmp/a.sock"), "/tmp/a.sock");
  assert.throws(() => socketPath("tcp://127.0.0.1:8081"), /not unix/);
});
