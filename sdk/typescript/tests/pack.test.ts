/**
 * The package as a user gets it: `npm pack`, installed into a fresh project
 * with TypeScript, where the README's TypeScript task block is compiled and
 * run against the broker. The token it prints is checked by a separate
 * script with stock `jose` alone (the JWKS over HTTPS, trusting the dev CA
 * through NODE_EXTRA_CA_CERTS), and the task is completed when the block is
 * left, also when it throws.
 */
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtempSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import { after, before, test } from "node:test";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { startBroker, type TestBroker } from "./broker.js";

const PKG = join(dirname(fileURLToPath(import.meta.url)), "..", "..");
const README = join(PKG, "..", "..", "README.md");
const GUIDE = join(PKG, "..", "..", "docs", "guides", "typescript-sdk.md");
const run = promisify(execFile);
let broker: TestBroker;

before(async () => {
  broker = await startBroker();
});
after(async () => {
  await broker.stop();
});

/** The README's TypeScript task block. */
function readmeBlock(): string {
  const m = /```ts\n([\s\S]*?)```/.exec(readFileSync(README, "utf8"));
  assert.ok(m?.[1], "the README has a ```ts block");
  return m[1];
}

/** The guide's ```ts file=NAME blocks, by name. */
function guideBlocks(): [string, string][] {
  const found = [...readFileSync(GUIDE, "utf8").matchAll(/```ts file=(\S+)\n([\s\S]*?)```/g)];
  assert.ok(found.length >= 4, "the guide has its examples");
  return found.map((m) => [m[1] ?? "", m[2] ?? ""]);
}

test("the packed SDK installs in a fresh project, and the README's block yields a token stock jose accepts", async () => {
  const work = mkdtempSync(join(tmpdir(), "mayfly-pack-"));
  await run("npm", ["pack", "--silent", "--pack-destination", work], { cwd: PKG });
  const tarball = readdirSync(work).find((f) => f.endsWith(".tgz"));
  assert.ok(tarball, "npm pack made a tarball");
  const project = join(work, "project");
  const lock = JSON.parse(readFileSync(join(PKG, "package-lock.json"), "utf8")) as {
    packages: Record<string, { version: string }>;
  };
  const version = (name: string) => lock.packages[`node_modules/${name}`]?.version ?? "latest";
  await run("mkdir", ["-p", project]);
  writeFileSync(
    join(project, "package.json"),
    JSON.stringify({ name: "fresh", private: true, type: "module" }),
  );
  writeFileSync(
    join(project, "tsconfig.json"),
    JSON.stringify({
      compilerOptions: {
        target: "ES2022",
        lib: ["ES2023", "ESNext.Disposable", "DOM"],
        module: "NodeNext",
        strict: true,
        skipLibCheck: false,
      },
    }),
  );
  await run(
    "npm",
    [
      "install",
      "--no-audit",
      "--no-fund",
      "--prefer-offline",
      "--loglevel=error",
      join(work, tarball),
      `typescript@${version("typescript")}`,
      `@types/node@${version("@types/node")}`,
      `express@${version("express")}`,
      `@types/express@${version("@types/express")}`,
      `hono@${version("hono")}`,
    ],
    { cwd: project },
  );
  // The README's block, then the token printed for the validator below.
  writeFileSync(
    join(project, "agent.ts"),
    `${readmeBlock()}\nconsole.log(task.taskId, token.token.value);\n`,
  );
  writeFileSync(
    join(project, "fails.ts"),
    `import { connect } from "@mayfly/sdk";
await using broker = connect();
await using task = await broker.startTask("fails", { audiences: ["https://api.example.com"] });
console.log(task.taskId);
throw new Error("the tool crashed");
`,
  );
  // Every example of the guide compiles against the package as installed.
  await run("mkdir", ["-p", join(project, "guide")]);
  for (const [name, code] of guideBlocks()) {
    writeFileSync(join(project, "guide", name), code);
  }
  await run(join(project, "node_modules", ".bin", "tsc"), ["-p", "."], { cwd: project }).catch(
    (e: { stdout: string }) => assert.fail(`tsc refused the examples:\n${e.stdout}`),
  );
  const env = { ...process.env, MAYFLY_PROFILE: broker.profile };
  const { stdout } = await run(process.execPath, ["agent.js"], { cwd: project, env });
  const [taskId, token] = stdout.trim().split("\n").at(-1)?.split(" ") ?? [];
  assert.ok(taskId && token, stdout);

  writeFileSync(
    join(project, "validate.mjs"),
    `import { createRemoteJWKSet, jwtVerify } from "jose";
const [issuer, audience, token] = process.argv.slice(2);
const jwks = createRemoteJWKSet(new URL(issuer + "/.well-known/jwks.json"));
const { payload } = await jwtVerify(token, jwks, { issuer, audience, typ: "at+jwt", algorithms: ["ES256", "EdDSA"] });
console.log("valid", payload.sub, payload.scope);
`,
  );
  const checked = await run(
    process.execPath,
    ["validate.mjs", broker.issuer, "https://api.example.com", token],
    {
      cwd: project,
      env: { ...process.env, NODE_EXTRA_CA_CERTS: join(broker.profile, "bundle.pem") },
    },
  );
  assert.equal(checked.stdout.trim(), "valid spiffe://example.org/agent/demo read:tickets");
  const task = broker.cliJson<{ state: string }>("task", "get", taskId);
  assert.equal(task.state, "completed");

  const failed = await run(process.execPath, ["fails.js"], { cwd: project, env }).then(
    () => assert.fail("the script should have thrown"),
    (e: { stdout: string; stderr: string }) => e,
  );
  assert.match(failed.stderr, /the tool crashed/);
  const crashed = broker.cliJson<{ state: string }>("task", "get", failed.stdout.trim());
  assert.equal(crashed.state, "completed");
});
