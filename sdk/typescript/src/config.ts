/**
 * Where the broker is and which identity to present: options first, then
 * `MAYFLY_BROKER`, `MAYFLY_CA`, `MAYFLY_CERT`, `MAYFLY_KEY`, then a profile
 * directory written by `mayfly dev init` (`profile`, `MAYFLY_PROFILE`, or
 * `./.mayfly-dev`), as the `mayfly` CLI finds them.
 *
 * An agent without a certificate presents a workload token instead
 * (`workloadToken`, or `MAYFLY_TOKEN_FILE`); the broker and its CA come from
 * the same places.
 */
import { existsSync, readFileSync, statSync } from "node:fs";
import { join } from "node:path";
import { ConfigError } from "./errors.js";
import type { WorkloadApi } from "./workload-api.js";
import { WorkloadToken } from "./workload-token.js";

export const DEFAULT_PROFILE = ".mayfly-dev";

export interface ConnectOptions {
  /** The broker's gRPC URL, e.g. "https://broker.internal:8710". */
  broker?: string;
  /** Path of the CA bundle that issued the broker's certificate. */
  ca?: string;
  /** Paths of the agent's X.509-SVID and its key (PEM). */
  cert?: string;
  key?: string;
  /** A `mayfly dev init` profile directory, and one of its identities. */
  profile?: string;
  identity?: string;
  /** Proves the agent with a workload token instead of a certificate. */
  workloadToken?: WorkloadToken;
  /** Takes the agent's certificate (and, without `ca`, the trust bundle) from the SPIFFE Workload API, following its rotations. */
  workloadApi?: WorkloadApi;
}

/** A resolved connection. The key and the token source never show in `inspect` or JSON. */
export class Connection {
  readonly #keyPem: string;
  constructor(
    readonly broker: string,
    readonly caPem: string,
    readonly certPem: string,
    keyPem: string,
    readonly workloadToken: WorkloadToken | undefined,
    readonly workloadApi?: WorkloadApi,
  ) {
    this.#keyPem = keyPem;
  }

  /** The same connection with another certificate (a rotated SVID). */
  withCertificate(certPem: string, keyPem: string): Connection {
    return new Connection(this.broker, this.caPem, certPem, keyPem, undefined, this.workloadApi);
  }
  get keyPem(): string {
    return this.#keyPem;
  }
  /** Whether the agent presents a client certificate (else a workload token). */
  get hasCertificate(): boolean {
    return this.certPem !== "";
  }
  toJSON(): object {
    return { broker: this.broker, hasCertificate: this.hasCertificate };
  }
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `Connection(${this.broker}, ${this.hasCertificate ? "certificate" : "workload token"})`;
  }
}

function read(path: string, what: string): string {
  try {
    return readFileSync(path, "utf8");
  } catch (e) {
    throw new ConfigError(`cannot read ${what} ${path}: ${(e as Error).message}`);
  }
}

/**
 * The named fields of the profile in `dir`. `mayfly dev init` writes a flat
 * file of `key = "string"` lines; anything else there is refused.
 */
export function readProfile(dir: string): Record<string, string> {
  const path = join(dir, "profile.toml");
  const out: Record<string, string> = {};
  for (const [i, raw] of read(path, "profile").split("\n").entries()) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#")) {
      continue;
    }
    const m = /^([A-Za-z0-9_-]+)\s*=\s*"((?:[^"\\]|\\.)*)"\s*(?:#.*)?$/.exec(line);
    if (!m?.[1] || m[2] === undefined) {
      throw new ConfigError(`invalid profile ${path}, line ${i + 1}: expected key = "value"`);
    }
    out[m[1]] = JSON.parse(`"${m[2]}"`) as string;
  }
  return out;
}

function field(profile: Record<string, string>, dir: string, name: string): string {
  const v = profile[name];
  if (v === undefined) {
    throw new ConfigError(`invalid profile ${join(dir, "profile.toml")}: no ${name}`);
  }
  return v;
}

/** The connection the options, the environment and the profile give. */
export function resolve(opts: ConnectOptions = {}): Connection {
  const env = process.env;
  const broker = opts.broker ?? env.MAYFLY_BROKER;
  const ca = opts.ca ?? env.MAYFLY_CA;
  const cert = opts.cert ?? env.MAYFLY_CERT;
  const key = opts.key ?? env.MAYFLY_KEY;
  const profile = opts.profile ?? env.MAYFLY_PROFILE;
  if (opts.workloadApi !== undefined) {
    if (opts.workloadToken !== undefined || opts.cert || opts.key) {
      throw new ConfigError(
        "the Workload API gives the certificate: pass no cert, key or workload token",
      );
    }
    const svid = opts.workloadApi.svid;
    let target = broker;
    let caPem = ca ? read(ca, "CA bundle") : svid.bundlePem;
    if (target === undefined) {
      const dir = profile ?? DEFAULT_PROFILE;
      if (!existsSync(join(dir, "profile.toml"))) {
        throw new ConfigError(
          "the Workload API gives no broker address: pass broker (or set MAYFLY_BROKER)",
        );
      }
      const p = readProfile(dir);
      target = field(p, dir, "broker");
      caPem = ca ? caPem : svid.bundlePem;
    }
    return new Connection(target, caPem, svid.certPem, svid.keyPem, undefined, opts.workloadApi);
  }
  if (opts.workloadToken !== undefined || env.MAYFLY_TOKEN_FILE) {
    if (opts.cert || opts.key) {
      throw new ConfigError(
        "a client certificate and a workload token: an agent proves itself with one",
      );
    }
    const source = opts.workloadToken ?? WorkloadToken.fromFile(env.MAYFLY_TOKEN_FILE ?? "");
    if (broker && ca) {
      return new Connection(broker, read(ca, "CA bundle"), "", "", source);
    }
    const dir = profile ?? DEFAULT_PROFILE;
    if (!existsSync(join(dir, "profile.toml"))) {
      throw new ConfigError(
        "a workload token needs the broker and its CA: pass broker and ca (or set MAYFLY_BROKER " +
          "and MAYFLY_CA), or profile, a directory from `mayfly dev init`",
      );
    }
    const p = readProfile(dir);
    return new Connection(
      broker ?? field(p, dir, "broker"),
      read(ca ?? join(dir, field(p, dir, "ca")), "CA bundle"),
      "",
      "",
      source,
    );
  }
  if (broker && ca && cert && key) {
    return new Connection(
      broker,
      read(ca, "CA bundle"),
      read(cert, "certificate"),
      read(key, "private key"),
      undefined,
    );
  }
  if (profile === undefined && !existsSync(join(DEFAULT_PROFILE, "profile.toml"))) {
    throw new ConfigError(
      "no broker connection: pass broker, ca, cert and key (or set MAYFLY_BROKER, MAYFLY_CA, " +
        "MAYFLY_CERT, MAYFLY_KEY), or profile, a directory from `mayfly dev init` " +
        "(default ./.mayfly-dev)",
    );
  }
  const dir = profile ?? DEFAULT_PROFILE;
  const p = readProfile(dir);
  const name = opts.identity ?? env.MAYFLY_IDENTITY ?? field(p, dir, "agent");
  if (name.includes("/") || name.startsWith(".")) {
    throw new ConfigError(`identity "${name}" must be a directory name under identities/`);
  }
  const idir = join(dir, "identities", name);
  if (!existsSync(idir) || !statSync(idir).isDirectory()) {
    throw new ConfigError(
      `identity "${name}" not found in ${join(dir, "identities")}; make one with ` +
        `\`mayfly dev identity --dir ${dir} spiffe://…\``,
    );
  }
  return new Connection(
    broker ?? field(p, dir, "broker"),
    read(ca ?? join(dir, field(p, dir, "ca")), "CA bundle"),
    read(cert ?? join(idir, "svid.pem"), "certificate"),
    read(key ?? join(idir, "svid.key"), "private key"),
    undefined,
  );
}

/** The broker URL as Connect wants it: https://host:port, nothing else. */
export function baseUrl(broker: string): string {
  const url = new URL(broker.includes("://") ? broker : `https://${broker}`);
  if (url.protocol !== "https:") {
    throw new ConfigError(`broker URL ${broker} must be https:// (the broker is mTLS)`);
  }
  if (!url.hostname || !url.port) {
    throw new ConfigError(`broker URL ${broker} needs a host and a port`);
  }
  return `https://${url.host}`;
}
