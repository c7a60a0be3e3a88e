/**
 * The service's side: `Verifier` checks Mayfly access tokens for one
 * audience, as mayfly-verify does, on `jose`:
 * - the `alg` allow-list (ES256, EdDSA) before any key is touched, so
 *   `none`, HS256 with the public key as secret, or RS256 never verify;
 * - `typ` at+jwt, a `kid` of the issuer's JWKS whose algorithm is the
 *   token's, the signature, `iss`, exactly one `aud` (ours), `exp`, `nbf`;
 * - `cnf`: a certificate-bound token needs that client certificate, a
 *   DPoP-bound one a valid proof for this request (and never comes as
 *   Bearer), each proof used once;
 * - revocation: from the broker's feed (failing closed while it has not
 *   replayed or has been silent too long) and/or its Token Status Lists
 *   (failing closed once a list is older than its ttl and cannot be had).
 *
 * The JWKS is fetched at start, refreshed in the background, and fetched
 * again for an unknown `kid` at most every `minRefreshSeconds`.
 */
import { createHash, X509Certificate } from "node:crypto";
import { inflateSync } from "node:zlib";
import { create } from "@bufbuild/protobuf";
import { timestampMs } from "@bufbuild/protobuf/wkt";
import { type Client, createClient } from "@connectrpc/connect";
import {
  type CryptoKey,
  calculateJwkThumbprint,
  decodeProtectedHeader,
  importJWK,
  type JWK,
  type JWTPayload,
  errors as joseErrors,
  jwtVerify,
} from "jose";
import { resolve } from "../config.js";
import { VerifyError } from "../errors.js";
import { Revocations, WatchRequestSchema } from "../gen/mayfly/v1/revocations_pb.js";
import { type OpenTransport, openTransport, type TlsIdentity } from "../transport.js";
import { withHiddenKey } from "../types.js";
import { httpsGet } from "./http.js";

export const ALGORITHMS = ["ES256", "EdDSA"] as const;
const MAX_LEEWAY = 60;
const MAX_JWKS_BYTES = 256 * 1024;
const DPOP_MAX_AGE = 60;
const DPOP_PROOFS_REMEMBERED = 100_000;
/** A list of 2^20 one-bit entries, the largest the broker serves. */
const MAX_STATUS_LIST_BYTES = 1 << 17;

/** How to follow the broker's revocation feed: its gRPC URL, the CA, this service's own SVID, and how long a silent feed is trusted. */
export interface FeedConfig extends TlsIdentity {
  maxSilenceSeconds?: number;
}

/** A feed configuration from a `mayfly dev init` profile and one of its identities. */
export function feedFromProfile(
  profile: string,
  identity: string,
  maxSilenceSeconds = 15,
): FeedConfig {
  const c = resolve({ profile, identity });
  return withHiddenKey({
    broker: c.broker,
    caPem: c.caPem,
    certPem: c.certPem,
    keyPem: c.keyPem,
    maxSilenceSeconds,
  });
}

/** Revocations from the Token Status Lists: each list kept for its `ttl`, at most `maxTtlSeconds`. */
export interface StatusListOptions {
  maxTtlSeconds?: number;
  maxBytes?: number;
}

export interface VerifierOptions {
  issuer: string;
  audience: string;
  /** PEM of the CA that issued the broker's HTTPS certificate; the system's CAs when absent. */
  ca?: string;
  /** Default: the issuer's /.well-known/jwks.json. */
  jwksUrl?: string;
  jwksRefreshSeconds?: number;
  minRefreshSeconds?: number;
  leewaySeconds?: number;
  feed?: FeedConfig;
  statusLists?: StatusListOptions | boolean;
}

/** A DPoP-scheme request: the `DPoP` header's proof, the method and the full URL the client sent to. */
export interface DpopRequest {
  proof: string;
  method: string;
  url: string;
}

/** A token that passed every check. `agent` is `sub` (the task's owner); `actor` the RFC 8693 `act` claim when a delegate or service acts for it. */
export interface VerifiedToken {
  agent: string;
  taskId: string;
  leaseId: string;
  scopes: string[];
  audience: string;
  expiresAt: number;
  actor: Record<string, unknown> | undefined;
  boundTo: string | undefined;
  dpopKey: string | undefined;
  claims: JWTPayload;
}

/** RFC 8705 `x5t#S256` of a certificate: DER bytes or PEM text. */
export function certThumbprint(cert: Uint8Array | string): string {
  const der = typeof cert === "string" ? new X509Certificate(cert).raw : cert;
  return createHash("sha256").update(der).digest("base64url");
}

/**
 * RFC 9449 §4.3 comparison form, as the Python SDK and mayfly-verify
 * compare: scheme and host lower-cased, the default port dropped, no query
 * or fragment; the path as sent (no dot segments resolved, nothing
 * re-encoded).
 */
export function normUrl(u: string): string {
  const bare = u.split("#", 1)[0]?.split("?", 1)[0] ?? "";
  const at = bare.indexOf("://");
  if (at < 0) {
    return bare;
  }
  const scheme = bare.slice(0, at).toLowerCase();
  const rest = bare.slice(at + 3);
  const slash = rest.indexOf("/");
  let authority = (slash < 0 ? rest : rest.slice(0, slash)).toLowerCase();
  const path = slash < 0 ? "" : rest.slice(slash + 1);
  const port = scheme === "https" ? ":443" : scheme === "http" ? ":80" : "";
  if (port && authority.endsWith(port)) {
    authority = authority.slice(0, -port.length);
  }
  return `${scheme}://${authority}/${path}`;
}

interface Key {
  key: CryptoKey | Uint8Array;
  alg: string;
}

class ReplayCache {
  readonly #seen = new Map<string, number>();
  constructor(private readonly capacity: number) {}

  /** Records a proof's `jti`; refuses one seen within the window, and refuses rather than forgets when full. */
  check(jkt: string, jti: string, iat: number): void {
    const now = Date.now() / 1000;
    for (const [k, at] of this.#seen) {
      if (at >= now - 2 * DPOP_MAX_AGE) {
        break;
      }
      this.#seen.delete(k);
    }
    const key = `${jkt}:${jti}`;
    if (this.#seen.has(key)) {
      throw new VerifyError("dpop_replayed", "DPoP proof jti was already used");
    }
    if (this.#seen.size >= this.capacity) {
      throw new VerifyError("dpop_busy", "too many DPoP proofs in flight; retry");
    }
    this.#seen.set(key, Math.max(iat, now));
  }
}

/** Revoked, unexpired credentials from the feed, and when it was last heard from. */
class FeedState {
  leases = new Map<string, number>();
  serials = new Map<string, number>();
  cursor = 0n;
  /** performance.now() of the last word; undefined until the replay is done. */
  lastHeard: number | undefined;
}

interface HeldList {
  bits: Uint8Array;
  fetchedAt: number;
  ttlMs: number;
}

export class Verifier implements AsyncDisposable {
  readonly issuer: string;
  readonly audience: string;
  readonly #ca: string | undefined;
  readonly #jwksUrl: string;
  readonly #leeway: number;
  readonly #refreshMs: number;
  readonly #minRefreshMs: number;
  #keys = new Map<string, Key>();
  #fetchedAt = 0;
  #fetching: Promise<boolean> | undefined;
  #refreshTimer: NodeJS.Timeout | undefined;
  readonly #replays = new ReplayCache(DPOP_PROOFS_REMEMBERED);
  readonly #feedConfig: FeedConfig | undefined;
  readonly #feed: FeedState | undefined;
  #feedTransport: OpenTransport | undefined;
  #feedAbort: AbortController | undefined;
  readonly #lists: StatusListOptions | undefined;
  readonly #held = new Map<string, HeldList>();
  readonly #listFetches = new Map<string, Promise<HeldList>>();
  #started: Promise<void> | undefined;
  #firstFailure: { at: number; error: VerifyError } | undefined;
  #closed = false;
  /** How many times the JWKS was fetched (for tests and metrics). */
  jwksFetches = 0;

  constructor(opts: VerifierOptions) {
    this.issuer = opts.issuer;
    this.audience = opts.audience;
    this.#ca = opts.ca;
    this.#jwksUrl = opts.jwksUrl ?? `${opts.issuer.replace(/\/+$/, "")}/.well-known/jwks.json`;
    this.#leeway = Math.min(Math.max(opts.leewaySeconds ?? 5, 0), MAX_LEEWAY);
    this.#refreshMs = (opts.jwksRefreshSeconds ?? 300) * 1000;
    this.#minRefreshMs = (opts.minRefreshSeconds ?? 10) * 1000;
    this.#feedConfig = opts.feed;
    this.#feed = opts.feed ? new FeedState() : undefined;
    this.#lists =
      opts.statusLists === true ? {} : opts.statusLists === false ? undefined : opts.statusLists;
  }

  /** Fetches the JWKS and starts following the feed (the first `verify` does it too). Throws `VerifyError` jwks_unavailable. */
  start(): Promise<void> {
    if (this.#closed) {
      return Promise.reject(new VerifyError("closed", "the verifier is closed", true));
    }
    // The feed does not wait for the keys: revocations are gathered from now.
    if (this.#feedConfig && !this.#feedTransport) {
      this.#feedTransport = openTransport(this.#feedConfig);
      void this.#follow(createClient(Revocations, this.#feedTransport.transport));
    }
    const failed = this.#firstFailure;
    if (failed !== undefined && performance.now() - failed.at < this.#minRefreshMs) {
      // A JWKS that could not be fetched is tried again at most every
      // minRefresh, however many requests come meanwhile.
      return Promise.reject(failed.error);
    }
    this.#started ??= (async () => {
      if (!(await this.refreshKeys(true))) {
        this.#started = undefined;
        const error = new VerifyError("jwks_unavailable", `cannot fetch ${this.#jwksUrl}`, true);
        this.#firstFailure = { at: performance.now(), error };
        throw error;
      }
      this.#firstFailure = undefined;
      if (this.#closed) {
        return;
      }
      this.#refreshTimer = setInterval(() => void this.refreshKeys(true), this.#refreshMs);
      this.#refreshTimer.unref();
    })();
    return this.#started;
  }

  /**
   * Resolves true once the feed has delivered its replay (tokens are
   * refused until then), false after `timeoutMs`; true at once without a
   * feed.
   */
  async waitForFeed(timeoutMs = 10_000): Promise<boolean> {
    await this.start();
    const deadline = performance.now() + timeoutMs;
    while (this.#feed !== undefined && this.#feed.lastHeard === undefined) {
      if (performance.now() > deadline || this.#closed) {
        return false;
      }
      await new Promise((r) => setTimeout(r, 20));
    }
    return true;
  }

  /** The feed's cursor: the last position it has seen. */
  get feedCursor(): bigint {
    return this.#feed?.cursor ?? 0n;
  }

  /** Whether the feed says the certificate with this serial (hex) was revoked. */
  isCertificateRevoked(serial: string): boolean {
    return this.#feed?.serials.has(serial.toUpperCase()) ?? false;
  }

  async #follow(client: Client<typeof Revocations>): Promise<void> {
    const feed = this.#feed;
    if (!feed) {
      return;
    }
    let backoff = 100;
    while (!this.#closed) {
      const abort = new AbortController();
      this.#feedAbort = abort;
      try {
        const stream = client.watchRevocations(
          create(WatchRequestSchema, { fromCursor: feed.cursor }),
          { signal: abort.signal },
        );
        for await (const e of stream) {
          const now = performance.now();
          if (e.heartbeat) {
            // The first heartbeat follows the replay of everything revoked:
            // from here on the set is complete.
            feed.lastHeard = now;
            const cutoff = Date.now() / 1000 - 60;
            for (const m of [feed.leases, feed.serials]) {
              for (const [k, exp] of m) {
                if (exp <= cutoff) {
                  m.delete(k);
                }
              }
            }
          } else {
            const exp = e.expiresAt ? timestampMs(e.expiresAt) / 1000 : Date.now() / 1000 + 3600;
            if (e.leaseId) {
              feed.leases.set(e.leaseId, exp);
            }
            if (e.serial) {
              feed.serials.set(e.serial.toUpperCase(), exp);
            }
            if (feed.lastHeard !== undefined) {
              feed.lastHeard = now;
            }
          }
          if (e.cursor > feed.cursor) {
            feed.cursor = e.cursor;
          }
          backoff = 100;
        }
      } catch {
        // Disconnected: reconnect from the cursor below.
      } finally {
        // Leaving the loop does not cancel the call by itself.
        abort.abort();
      }
      if (this.#closed) {
        return;
      }
      await new Promise((r) => setTimeout(r, backoff).unref());
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  /**
   * Fetches the JWKS again; at most once per `minRefreshSeconds` unless
   * `force`. Resolves whether a key set is held. Concurrent callers share
   * one fetch.
   */
  refreshKeys(force = false): Promise<boolean> {
    if (!force && performance.now() - this.#fetchedAt < this.#minRefreshMs) {
      return Promise.resolve(this.#keys.size > 0);
    }
    this.#fetching ??= (async () => {
      this.#fetchedAt = performance.now();
      try {
        const got = await httpsGet(this.#jwksUrl, {
          ca: this.#ca,
          accept: "application/json",
          maxBytes: MAX_JWKS_BYTES,
          timeoutMs: 5000,
        });
        if (got.status !== 200) {
          return this.#keys.size > 0;
        }
        const doc = JSON.parse(got.body.toString("utf8")) as { keys?: JWK[] };
        const keys = new Map<string, Key>();
        for (const jwk of doc.keys ?? []) {
          const alg = jwk.alg;
          if (typeof jwk.kid !== "string" || !ALGORITHMS.includes(alg as never) || jwk.d) {
            continue;
          }
          try {
            keys.set(jwk.kid, { key: await importJWK(jwk, alg), alg: alg as string });
          } catch {
            // A key this runtime cannot use is skipped; the others still serve.
          }
        }
        this.#keys = keys;
        this.jwksFetches += 1;
        return true;
      } catch {
        return this.#keys.size > 0;
      } finally {
        this.#fetching = undefined;
      }
    })();
    return this.#fetching;
  }

  /**
   * The verified token, or a thrown `VerifyError` naming the failed check.
   * A token sent with the DPoP scheme is checked with `dpop`; a
   * certificate-bound one needs `clientCert` (DER or PEM).
   */
  async verify(
    token: string,
    opts: { clientCert?: Uint8Array | string; dpop?: DpopRequest } = {},
  ): Promise<VerifiedToken> {
    if (this.#closed) {
      throw new VerifyError("closed", "the verifier is closed", true);
    }
    await this.start();
    const claims = await this.#checkToken(token);
    // The status list first: fetching it must not spend the request's DPoP proof.
    if (this.#lists) {
      await this.#checkStatus(claims);
    }
    const [boundTo, jkt] = binding(claims.cnf);
    if (boundTo !== undefined) {
      if (opts.clientCert === undefined) {
        throw new VerifyError("certificate_required", "the token is bound to a client certificate");
      }
      if (certThumbprint(opts.clientCert) !== boundTo) {
        throw new VerifyError(
          "certificate_mismatch",
          "the presented certificate is not the bound one",
        );
      }
    }
    if (opts.dpop === undefined && jkt !== undefined) {
      throw new VerifyError("dpop_required", "a DPoP-bound token came as a bearer token");
    }
    if (opts.dpop !== undefined) {
      if (jkt === undefined) {
        throw new VerifyError("not_dpop_bound", "the DPoP scheme with an unbound token");
      }
      await this.#checkProof(token, opts.dpop, jkt);
    }
    this.#checkFeed(claims);
    const scope = claims.scope;
    const act = claims.act;
    return {
      agent: claims.sub as string,
      taskId: claims.task_id as string,
      leaseId: claims.jti as string,
      scopes: typeof scope === "string" ? scope.split(" ").filter((s) => s) : [],
      audience: this.audience,
      expiresAt: claims.exp as number,
      actor: typeof act === "object" && act !== null ? (act as Record<string, unknown>) : undefined,
      boundTo,
      dpopKey: jkt,
      claims,
    };
  }

  async #key(kid: unknown): Promise<Key | undefined> {
    if (typeof kid !== "string") {
      return undefined;
    }
    const held = this.#keys.get(kid);
    if (held !== undefined) {
      return held;
    }
    // An unknown kid may be a rotation: fetch again, at most every minRefresh.
    await this.refreshKeys();
    return this.#keys.get(kid);
  }

  async #checkToken(token: string): Promise<JWTPayload> {
    if (token.split(".").length !== 3) {
      throw new VerifyError("malformed", "expected three dot-separated parts");
    }
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(token);
    } catch {
      throw new VerifyError("malformed", "header is not base64url JSON");
    }
    // Allow-list first: none, HS*, RS* never reach a key.
    const alg = header.alg;
    if (!ALGORITHMS.includes(alg as never)) {
      throw new VerifyError(
        "algorithm",
        `alg ${JSON.stringify(alg)} is not accepted (ES256 or EdDSA)`,
      );
    }
    const typ = typeof header.typ === "string" ? header.typ.toLowerCase() : "";
    if (typ !== "at+jwt" && typ !== "application/at+jwt") {
      throw new VerifyError("wrong_type", `typ ${JSON.stringify(header.typ)} is not at+jwt`);
    }
    const key = await this.#key(header.kid);
    if (key === undefined) {
      throw new VerifyError(
        "unknown_key",
        `kid ${JSON.stringify(header.kid)} is not in the issuer's JWKS`,
      );
    }
    if (key.alg !== alg) {
      throw new VerifyError(
        "key_algorithm_mismatch",
        `kid ${header.kid} is a ${key.alg} key, not ${alg}`,
      );
    }
    let claims: JWTPayload;
    try {
      ({ payload: claims } = await jwtVerify(token, key.key, {
        algorithms: [alg as string],
        issuer: this.issuer,
        audience: this.audience,
        clockTolerance: this.#leeway,
        requiredClaims: ["exp", "iss", "aud", "sub", "nbf", "jti"],
      }));
    } catch (e) {
      throw joseRefusal(e, this.issuer, this.audience);
    }
    // jose checks iat only against a maximum age: one from the future is refused here.
    if (typeof claims.iat === "number" && claims.iat > Date.now() / 1000 + this.#leeway) {
      throw new VerifyError("not_yet_valid", "iat is in the future");
    }
    // Exactly one audience, ours (Mayfly tokens carry one).
    if (claims.aud !== this.audience) {
      throw new VerifyError("wrong_audience", `aud must be exactly ${this.audience}`);
    }
    for (const name of ["sub", "jti", "task_id"]) {
      const v = claims[name];
      if (typeof v !== "string" || v === "") {
        throw new VerifyError("missing_claim", `claim ${name} is missing`);
      }
    }
    if (!(claims.sub as string).startsWith("spiffe://")) {
      throw new VerifyError("malformed", "claim sub is not a SPIFFE ID");
    }
    return claims;
  }

  #checkFeed(claims: JWTPayload): void {
    const feed = this.#feed;
    if (!feed) {
      return;
    }
    if (feed.lastHeard === undefined) {
      throw new VerifyError(
        "feed_not_synced",
        "the revocation feed has not delivered its replay yet",
        true,
      );
    }
    const silence = (performance.now() - feed.lastHeard) / 1000;
    const max = this.#feedConfig?.maxSilenceSeconds ?? 15;
    if (silence > max) {
      throw new VerifyError(
        "feed_stale",
        `no word from the revocation feed for ${silence.toFixed(1)} s`,
        true,
      );
    }
    if (feed.leases.has(claims.jti as string)) {
      throw new VerifyError("revoked", "the broker revoked this token");
    }
  }

  async #checkProof(token: string, dpop: DpopRequest, jkt: string): Promise<void> {
    const { proof, method, url } = dpop;
    if (proof.length > 4096 || proof.split(".").length !== 3) {
      throw new VerifyError("dpop_malformed", "the DPoP proof is not a compact JWS");
    }
    let header: ReturnType<typeof decodeProtectedHeader>;
    try {
      header = decodeProtectedHeader(proof);
    } catch (e) {
      throw new VerifyError("dpop_malformed", String(e));
    }
    if (header.typ !== "dpop+jwt") {
      throw new VerifyError("dpop_type", 'DPoP proof typ must be "dpop+jwt"');
    }
    const alg = header.alg;
    if (!ALGORITHMS.includes(alg as never)) {
      throw new VerifyError(
        "dpop_algorithm",
        `DPoP proof alg ${JSON.stringify(alg)} is not accepted`,
      );
    }
    const jwk = header.jwk;
    if (typeof jwk !== "object" || jwk === null || "d" in jwk) {
      throw new VerifyError("dpop_key", "DPoP proof jwk is missing or private");
    }
    const [kty, crv] = alg === "ES256" ? ["EC", "P-256"] : ["OKP", "Ed25519"];
    if (jwk.kty !== kty || jwk.crv !== crv) {
      throw new VerifyError("dpop_key", `DPoP proof jwk is not a ${crv} key for ${alg}`);
    }
    let claims: JWTPayload;
    try {
      const key = await importJWK(jwk, alg);
      ({ payload: claims } = await jwtVerify(proof, key, {
        algorithms: [alg as string],
        typ: "dpop+jwt",
      }));
    } catch (e) {
      if (e instanceof joseErrors.JWSSignatureVerificationFailed) {
        throw new VerifyError("dpop_signature", "DPoP proof signature does not verify");
      }
      throw new VerifyError("dpop_malformed", (e as Error).message);
    }
    const { jti, htm, htu, iat } = claims as Record<string, unknown>;
    if (typeof jti !== "string" || jti.length === 0 || jti.length > 256) {
      throw new VerifyError("dpop_malformed", "DPoP proof jti must be 1 to 256 bytes");
    }
    if (htm !== method) {
      throw new VerifyError(
        "dpop_method",
        `DPoP proof htm ${JSON.stringify(htm)} is not ${method}`,
      );
    }
    if (typeof htu !== "string" || normUrl(htu) !== normUrl(url)) {
      throw new VerifyError("dpop_url", `DPoP proof htu ${JSON.stringify(htu)} is not ${url}`);
    }
    if (typeof iat !== "number") {
      throw new VerifyError("dpop_malformed", "DPoP proof iat is missing");
    }
    const now = Date.now() / 1000;
    if (now - iat > DPOP_MAX_AGE) {
      throw new VerifyError("dpop_stale", `DPoP proof iat is ${Math.round(now - iat)} s ago`);
    }
    if (iat - now > DPOP_MAX_AGE) {
      throw new VerifyError("dpop_future", `DPoP proof iat is ${Math.round(iat - now)} s ahead`);
    }
    if (claims.ath !== createHash("sha256").update(token).digest("base64url")) {
      throw new VerifyError("dpop_ath", "DPoP proof ath does not match the access token");
    }
    const thumb = await calculateJwkThumbprint(jwk as JWK, "sha256");
    if (thumb !== jkt) {
      throw new VerifyError("dpop_wrong_key", "DPoP proof key is not the token's cnf.jkt");
    }
    this.#replays.check(thumb, jti, iat);
  }

  async #checkStatus(claims: JWTPayload): Promise<void> {
    const prefix = `${this.issuer.replace(/\/+$/, "")}/statuslists/`;
    const status = claims.status as { status_list?: { uri?: unknown; idx?: unknown } } | undefined;
    const ref = typeof status === "object" && status !== null ? status.status_list : undefined;
    if (typeof ref !== "object" || ref === null) {
      throw new VerifyError("status_missing", "the token names no status list");
    }
    const { uri, idx } = ref;
    if (
      typeof uri !== "string" ||
      !uri.startsWith(prefix) ||
      !/^[0-9]+$/.test(uri.slice(prefix.length)) ||
      typeof idx !== "number" ||
      !Number.isInteger(idx) ||
      idx < 0
    ) {
      throw new VerifyError("status_missing", "the token's status list is not the issuer's");
    }
    const list = await this.#list(uri);
    // An index past the list is revoked: a list never shrinks below a live token.
    const byte = list.bits[Math.floor(idx / 8)];
    if (byte === undefined || (byte >> (idx % 8)) & 1) {
      throw new VerifyError("revoked", "the token's status list marks it revoked");
    }
  }

  /** The list at `uri`: the copy held while younger than its ttl (fetched again in the background past half of it), else fetched now. */
  async #list(uri: string): Promise<HeldList> {
    const held = this.#held.get(uri);
    const now = performance.now();
    const fetchOnce = (): Promise<HeldList> => {
      let running = this.#listFetches.get(uri);
      if (running === undefined) {
        running = this.#fetchList(uri).finally(() => this.#listFetches.delete(uri));
        this.#listFetches.set(uri, running);
      }
      return running;
    };
    if (held !== undefined && now - held.fetchedAt < held.ttlMs) {
      if (now - held.fetchedAt > held.ttlMs / 2) {
        fetchOnce().catch(() => undefined);
      }
      return held;
    }
    try {
      return await fetchOnce();
    } catch (e) {
      throw new VerifyError(
        "status_unavailable",
        `status list ${uri}: ${(e as Error).message}`,
        true,
      );
    }
  }

  async #fetchList(uri: string): Promise<HeldList> {
    const maxBytes = this.#lists?.maxBytes ?? 1 << 20;
    const got = await httpsGet(uri, {
      ca: this.#ca,
      accept: "application/statuslist+jwt",
      maxBytes,
      timeoutMs: 5000,
    });
    if (got.status !== 200) {
      throw new Error(`HTTP ${got.status}`);
    }
    const jwt = got.body.toString("ascii");
    const header = decodeProtectedHeader(jwt);
    if (header.typ !== "statuslist+jwt") {
      throw new Error(`typ ${JSON.stringify(header.typ)} is not statuslist+jwt`);
    }
    if (!ALGORITHMS.includes(header.alg as never)) {
      throw new Error(`alg ${JSON.stringify(header.alg)} is not accepted`);
    }
    const key = await this.#key(header.kid);
    if (key === undefined || key.alg !== header.alg) {
      throw new Error(
        `kid ${JSON.stringify(header.kid)} is not an ${header.alg} key of the issuer`,
      );
    }
    const { payload } = await jwtVerify(jwt, key.key, {
      algorithms: [key.alg],
      issuer: this.issuer,
      subject: uri,
      typ: "statuslist+jwt",
      clockTolerance: this.#leeway,
      requiredClaims: ["sub", "iat", "exp"],
    });
    const body = payload.status_list as { bits?: unknown; lst?: unknown } | undefined;
    if (
      typeof body !== "object" ||
      body === null ||
      body.bits !== 1 ||
      typeof body.lst !== "string"
    ) {
      throw new Error("not a status list of one bit per token");
    }
    let bits: Buffer;
    try {
      bits = inflateSync(Buffer.from(body.lst, "base64url"), {
        maxOutputLength: MAX_STATUS_LIST_BYTES,
      });
    } catch (e) {
      throw new Error(
        `lst does not inflate within ${MAX_STATUS_LIST_BYTES} bytes: ${(e as Error).message}`,
      );
    }
    const ttl = typeof payload.ttl === "number" && payload.ttl > 0 ? payload.ttl : 0;
    const keep = Math.min(
      ttl,
      this.#lists?.maxTtlSeconds ?? 60,
      (payload.exp as number) - Date.now() / 1000,
    );
    const list = { bits, fetchedAt: performance.now(), ttlMs: Math.max(keep, 0) * 1000 };
    this.#held.set(uri, list);
    return list;
  }

  /** Stops following the feed and refreshing keys. */
  close(): void {
    this.#closed = true;
    if (this.#refreshTimer) {
      clearInterval(this.#refreshTimer);
    }
    this.#feedAbort?.abort();
    this.#feedTransport?.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}

/**
 * The token's `cnf` members: a certificate thumbprint and a DPoP key
 * thumbprint. A member that is present but not a non-empty string is
 * refused, never read as "unbound".
 */
export function binding(cnf: unknown): [string | undefined, string | undefined] {
  if (cnf === undefined) {
    return [undefined, undefined];
  }
  if (typeof cnf !== "object" || cnf === null || Array.isArray(cnf)) {
    throw new VerifyError("malformed", "claim cnf is not an object");
  }
  const member = (name: string): string | undefined => {
    if (!(name in cnf)) {
      return undefined;
    }
    const v = (cnf as Record<string, unknown>)[name];
    if (typeof v !== "string" || v === "") {
      throw new VerifyError("malformed", `cnf.${name} is not a thumbprint`);
    }
    return v;
  };
  return [member("x5t#S256"), member("jkt")];
}

function joseRefusal(e: unknown, issuer: string, audience: string): VerifyError {
  if (e instanceof joseErrors.JWSSignatureVerificationFailed) {
    return new VerifyError("bad_signature", "the signature does not verify");
  }
  if (e instanceof joseErrors.JWTExpired) {
    return new VerifyError("expired", "exp has passed");
  }
  if (e instanceof joseErrors.JWTClaimValidationFailed) {
    switch (e.claim) {
      case "nbf":
        return e.reason === "missing"
          ? new VerifyError("missing_claim", "claim nbf is missing")
          : new VerifyError("not_yet_valid", "nbf is in the future");
      case "iss":
        return e.reason === "missing"
          ? new VerifyError("missing_claim", "claim iss is missing")
          : new VerifyError("wrong_issuer", `iss is not ${issuer}`);
      case "aud":
        return e.reason === "missing"
          ? new VerifyError("missing_claim", "claim aud is missing")
          : new VerifyError("wrong_audience", `aud is not ${audience}`);
      default:
        return e.reason === "missing"
          ? new VerifyError("missing_claim", `claim ${e.claim} is missing`)
          : new VerifyError("malformed", e.message);
    }
  }
  return new VerifyError("malformed", (e as Error).message);
}
