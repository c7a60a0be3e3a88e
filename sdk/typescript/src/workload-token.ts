/**
 * Agents without a client certificate: a signed workload token (a Kubernetes
 * projected service-account token, a SPIFFE JWT-SVID, a CI or cloud OIDC
 * token) proves the agent instead, if the broker trusts its issuer
 * (`[[federation]]`). It travels as `authorization: Bearer` on every call
 * over server-authenticated TLS.
 *
 * The broker accepts a token with a `jti` once unless its issuer is
 * configured otherwise; when it answers that the token was already used or
 * has expired, the client fetches a fresh one and tries the call once more.
 * The token is never logged, and `inspect` does not show it.
 */
import { readFileSync } from "node:fs";
import { decodeJwt } from "jose";
import { ConfigError } from "./errors.js";

/** A token this close to its `exp` (seconds) is fetched again before it is sent. */
export const RENEW_MARGIN = 30;

/** The broker's names for a refusal that a fresh token may cure. */
export const RENEWABLE = new Set(["workload_token_used", "workload_token_expired"]);

function expiry(token: string): number | undefined {
  // Read without verifying (the broker verifies): only to know when to fetch the next one.
  try {
    const exp = decodeJwt(token).exp;
    return typeof exp === "number" ? exp : undefined;
  } catch {
    return undefined;
  }
}

/** A source of the agent's workload token: a file, or a callback that fetches one. */
export class WorkloadToken {
  #token: string | undefined;
  #expires: number | undefined;

  private constructor(
    private readonly fetch: () => string | Promise<string>,
    private readonly label: string,
  ) {}

  /** The token in `path` (e.g. a projected service-account token), read now and whenever a fresh one is needed. */
  static fromFile(path: string): WorkloadToken {
    const readToken = (): string => {
      try {
        return readFileSync(path, "ascii");
      } catch (e) {
        throw new ConfigError(
          `cannot read the workload token file ${path}: ${(e as Error).message}`,
        );
      }
    };
    const source = new WorkloadToken(readToken, `file ${path}`);
    source.#hold(readToken());
    return source;
  }

  /** Tokens from `fetch()`, called for the first token and whenever a fresh one is needed. */
  static fromCallback(fetch: () => string | Promise<string>, label = "callback"): WorkloadToken {
    return new WorkloadToken(fetch, label);
  }

  #hold(raw: string): string {
    const token = raw.trim();
    if (!token) {
      throw new ConfigError(`the workload token from ${this.label} is empty`);
    }
    this.#token = token;
    this.#expires = expiry(token);
    return token;
  }

  /** The token to send: the one held, unless it is about to expire. */
  async current(): Promise<string> {
    const token = this.#token;
    const expires = this.#expires;
    if (
      token !== undefined &&
      (expires === undefined || expires - Date.now() / 1000 > RENEW_MARGIN)
    ) {
      return token;
    }
    return this.renew();
  }

  /** Fetches a new token and holds it from now on. */
  async renew(): Promise<string> {
    return this.#hold(await this.fetch());
  }

  toString(): string {
    return `WorkloadToken(${this.label})`;
  }
  toJSON(): string {
    return this.toString();
  }
  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return this.toString();
  }
}
