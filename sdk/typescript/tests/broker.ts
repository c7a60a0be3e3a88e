/**
 * Test fixtures: a real broker from this repository's `mayfly` binary (a
 * fresh `mayfly dev init` profile on free ports, run as its own process),
 * the identities the tests play, and the CLI for the operator's part.
 */
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { randomUUID } from "node:crypto";
import {
  copyFileSync,
  existsSync,
  mkdtempSync,
  openSync,
  readFileSync,
  writeFileSync,
} from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

export const REPO = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const TD = "example.org";
export const AGENT = `spiffe://${TD}/agent/demo`;
export const OTHER_AGENT = `spiffe://${TD}/agent/bob`;
export const SERVICE = `spiffe://${TD}/api/tickets`;
export const API = "https://api.example.com";

export function mayflyBin(): string {
  const path = process.env.MAYFLY_BIN ?? join(REPO, "target", "debug", "mayfly");
  if (!existsSync(path)) {
    throw new Error(
      `no mayfly binary at ${path}: \`cargo build -p mayfly-cli\`, or set MAYFLY_BIN`,
    );
  }
  return path;
}

export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const s = createServer();
    s.unref();
    s.on("error", fail);
    s.listen(0, "127.0.0.1", () => {
      const addr = s.address();
      const port = typeof addr === "object" && addr ? addr.port : 0;
      s.close(() => ok(port));
    });
  });
}

function listening(port: number): Promise<boolean> {
  return new Promise((ok) => {
    const c = tcpConnect(port, "127.0.0.1");
    c.once("connect", () => {
      c.destroy();
      ok(true);
    });
    c.once("error", () => ok(false));
  });
}

export async function eventually(
  what: string,
  cond: () => boolean | Promise<boolean>,
  timeoutMs = 10_000,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await cond())) {
    if (Date.now() > deadline) {
      throw new Error(`timed out waiting until ${what}`);
    }
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** A policy `id` letting the dev agents open tasks for `audience` and get read tokens for it. */
export function readPolicy(id: string, audience: string): string {
  return `
@id("${id}")
permit (
  principal in Mayfly::Path::"spiffe://${TD}/agent",
  action in [Mayfly::Action::"start_task", Mayfly::Action::"issue_token"],
  resource == Mayfly::Audience::"${audience}"
)
when { ["read"].containsAll(context.scope_prefixes) };
`;
}

export class TestBroker {
  proc: ChildProcess | undefined;

  constructor(
    readonly profile: string,
    readonly config: string,
    readonly grpcPort: number,
    readonly httpPort: number,
  ) {}

  get issuer(): string {
    return `https://localhost:${this.httpPort}`;
  }
  get grpcUrl(): string {
    return `https://localhost:${this.grpcPort}`;
  }
  get caPem(): string {
    return readFileSync(join(this.profile, "bundle.pem"), "utf8");
  }

  /** `mayfly --profile … ARGS`, its standard output; throws with its stderr if it fails. */
  cli(...args: string[]): string {
    return execFileSync(mayflyBin(), ["--profile", this.profile, ...args], {
      encoding: "utf8",
      stdio: ["ignore", "pipe", "pipe"],
    });
  }

  cliJson<T = unknown>(...args: string[]): T {
    return JSON.parse(this.cli("--json", ...args)) as T;
  }

  async start(): Promise<void> {
    const log = openSync(join(this.profile, "broker.log"), "a");
    this.proc = spawn(mayflyBin(), ["serve", "--config", this.config], {
      stdio: ["ignore", log, log],
    });
    const proc = this.proc;
    await eventually(
      "the broker listens",
      async () => {
        if (proc.exitCode !== null) {
          throw new Error(
            `the broker exited with ${proc.exitCode}: see ${this.profile}/broker.log`,
          );
        }
        return (await listening(this.httpPort)) && (await listening(this.grpcPort));
      },
      30_000,
    );
  }

  async stop(): Promise<void> {
    const proc = this.proc;
    if (proc && proc.exitCode === null) {
      const exited = new Promise((r) => proc.once("exit", r));
      proc.kill("SIGTERM");
      await exited;
    }
    this.proc = undefined;
    // CI searches every test broker's audit trail for secrets.
    const trail = join(this.profile, "data", "audit.jsonl");
    const keep = process.env.MAYFLY_TEST_AUDIT_DIR;
    if (keep && existsSync(trail)) {
      copyFileSync(trail, join(keep, `typescript-sdk-${randomUUID()}.jsonl`));
    }
  }
}

/** A fresh dev profile (with a second agent and a service identity) served on free ports. */
export async function startBroker(
  opts: { heartbeat?: string; extra?: string; policies?: string } = {},
): Promise<TestBroker> {
  const root = mkdtempSync(join(tmpdir(), "mayfly-ts-"));
  const profile = join(root, ".mayfly-dev");
  execFileSync(mayflyBin(), ["dev", "init", "--dir", profile], { stdio: "ignore" });
  for (const identity of [OTHER_AGENT, SERVICE]) {
    execFileSync(mayflyBin(), ["dev", "identity", "--dir", profile, identity], { stdio: "ignore" });
  }
  const grpc = await freePort();
  const http = await freePort();
  const config = join(profile, "mayfly.toml");
  let text = readFileSync(config, "utf8")
    .replaceAll("127.0.0.1:8710", `127.0.0.1:${grpc}`)
    .replaceAll("127.0.0.1:8711", `127.0.0.1:${http}`)
    .replaceAll("localhost:8711", `localhost:${http}`);
  if (!text.includes(`127.0.0.1:${grpc}`)) {
    throw new Error("the dev configuration changed shape");
  }
  text += `\n[feed]\nheartbeat = "${opts.heartbeat ?? "200ms"}"\n${opts.extra ?? ""}`;
  writeFileSync(config, text);
  if (opts.policies) {
    writeFileSync(join(profile, "policies", "extra.cedar"), opts.policies);
  }
  const prof = join(profile, "profile.toml");
  writeFileSync(prof, readFileSync(prof, "utf8").replace("localhost:8710", `localhost:${grpc}`));
  const b = new TestBroker(profile, config, grpc, http);
  await b.start();
  return b;
}
