/**
 * The agent's X.509-SVID from the SPIFFE Workload API (a SPIRE agent's
 * socket): `FetchX509SVID` streamed over a Unix socket with the
 * `workload.spiffe.io: true` header the spec requires. The first SVID is
 * waited for; each one the agent pushes later (rotation) replaces it, and a
 * `Broker` made from the source reconnects with it.
 *
 *     await using source = await WorkloadApi.open(); // SPIFFE_ENDPOINT_SOCKET
 *     await using broker = connect({ workloadApi: source, broker: "https://broker:8710" });
 */
import { createPrivateKey } from "node:crypto";
import { connect as netConnect } from "node:net";
import { create } from "@bufbuild/protobuf";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { ConfigError } from "./errors.js";
import { SpiffeWorkloadAPI, X509SVIDRequestSchema } from "./gen/spiffe/workload_pb.js";
import { withHiddenKey } from "./types.js";

/** One X.509-SVID as PEM: its chain (leaf first), its key, and its trust domain's bundle. */
export interface X509Svid {
  spiffeId: string;
  certPem: string;
  keyPem: string;
  bundlePem: string;
}

function pem(label: string, der: Uint8Array): string {
  const body = Buffer.from(der)
    .toString("base64")
    .replace(/(.{64})/g, "$1\n")
    .replace(/\n$/, "");
  return `-----BEGIN ${label}-----\n${body}\n-----END ${label}-----\n`;
}

/** Certificates concatenated as DER (the Workload API's form), each as PEM. */
export function certificatesPem(der: Uint8Array): string {
  let out = "";
  let at = 0;
  while (at < der.length) {
    if (der[at] !== 0x30 || at + 2 > der.length) {
      throw new ConfigError("the Workload API sent a certificate that is not DER");
    }
    const first = der[at + 1] ?? 0;
    let len = first;
    let head = 2;
    if (first & 0x80) {
      const n = first & 0x7f;
      if (n === 0 || n > 4 || at + 2 + n > der.length) {
        throw new ConfigError("the Workload API sent a certificate that is not DER");
      }
      len = 0;
      for (let i = 0; i < n; i++) {
        len = len * 256 + (der[at + 2 + i] ?? 0);
      }
      head = 2 + n;
    }
    const end = at + head + len;
    if (end > der.length) {
      throw new ConfigError("the Workload API sent a truncated certificate");
    }
    out += pem("CERTIFICATE", der.subarray(at, end));
    at = end;
  }
  return out;
}

/** The Unix socket path of a Workload API endpoint ("unix:///run/spire/agent.sock"). */
export function socketPath(endpoint: string): string {
  const m = /^unix:(?:\/\/)?(\/.+)$/.exec(endpoint);
  if (!m?.[1]) {
    throw new ConfigError(
      `Workload API endpoint ${endpoint} is not unix:///path (a TCP endpoint is not supported)`,
    );
  }
  return m[1];
}

export class WorkloadApi implements AsyncDisposable {
  #svid: X509Svid | undefined;
  readonly #listeners = new Set<(svid: X509Svid) => void>();
  readonly #abort = new AbortController();
  readonly #sessions: Http2SessionManager;

  private constructor(readonly endpoint: string) {
    const path = socketPath(endpoint);
    this.#sessions = new Http2SessionManager("http://localhost", undefined, {
      createConnection: () => netConnect(path),
    });
  }

  /**
   * Connects to the Workload API at `endpoint` (default
   * `SPIFFE_ENDPOINT_SOCKET`) and resolves once it has sent an SVID; throws
   * `ConfigError` if none comes within `timeoutMs`.
   */
  static async open(
    endpoint = process.env.SPIFFE_ENDPOINT_SOCKET,
    timeoutMs = 10_000,
  ): Promise<WorkloadApi> {
    if (!endpoint) {
      throw new ConfigError("no Workload API endpoint: pass one, or set SPIFFE_ENDPOINT_SOCKET");
    }
    const api = new WorkloadApi(endpoint);
    const first = new Promise<void>((resolve, reject) => {
      const timer = setTimeout(
        () =>
          reject(
            new ConfigError(
              `no X.509-SVID from the Workload API at ${endpoint} within ${timeoutMs} ms`,
            ),
          ),
        timeoutMs,
      );
      api.#listeners.add(() => {
        clearTimeout(timer);
        resolve();
      });
      api.#follow().catch((e: unknown) => {
        clearTimeout(timer);
        reject(e);
      });
    });
    try {
      await first;
    } catch (e) {
      api.close();
      throw e;
    }
    return api;
  }

  async #follow(): Promise<void> {
    const transport = createGrpcTransport({
      baseUrl: "http://localhost",
      sessionManager: this.#sessions,
      interceptors: [
        (next) => (req) => {
          req.header.set("workload.spiffe.io", "true");
          return next(req);
        },
      ],
    });
    const client = createClient(SpiffeWorkloadAPI, transport);
    let backoff = 100;
    while (!this.#abort.signal.aborted) {
      try {
        for await (const res of client.fetchX509SVID(create(X509SVIDRequestSchema), {
          signal: this.#abort.signal,
        })) {
          const s = res.svids[0];
          if (!s) {
            continue;
          }
          const svid: X509Svid = withHiddenKey({
            spiffeId: s.spiffeId,
            certPem: certificatesPem(s.x509Svid),
            keyPem: createPrivateKey({
              key: Buffer.from(s.x509SvidKey),
              format: "der",
              type: "pkcs8",
            })
              .export({ format: "pem", type: "pkcs8" })
              .toString(),
            bundlePem: certificatesPem(s.bundle),
          });
          this.#svid = svid;
          backoff = 100;
          for (const listener of this.#listeners) {
            listener(svid);
          }
        }
      } catch (e) {
        if (this.#svid === undefined && !this.#abort.signal.aborted) {
          throw new ConfigError(`the Workload API at ${this.endpoint}: ${(e as Error).message}`);
        }
      }
      // The stream ended or broke: keep the SVID held and ask again.
      await new Promise((r) => setTimeout(r, backoff).unref());
      backoff = Math.min(backoff * 2, 5000);
    }
  }

  /** The SVID held now. */
  get svid(): X509Svid {
    if (this.#svid === undefined) {
      throw new ConfigError("the Workload API has sent no SVID yet");
    }
    return this.#svid;
  }

  /** Calls `listener` with each SVID the Workload API sends from now on; returns the way to stop. */
  onUpdate(listener: (svid: X509Svid) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }

  close(): void {
    this.#abort.abort();
    this.#sessions.abort();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }

  [Symbol.for("nodejs.util.inspect.custom")](): string {
    return `WorkloadApi(${this.endpoint}${this.#svid ? `, ${this.#svid.spiffeId}` : ""})`;
  }
}
