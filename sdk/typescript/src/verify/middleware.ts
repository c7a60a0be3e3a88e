/**
 * The Verifier in front of a service, with RFC 6750 / RFC 9449 answers:
 * 401 with `WWW-Authenticate` for a missing or refused token, 403
 * `insufficient_scope` for a token without the scopes asked, 503 when the
 * verifier itself cannot decide (no JWKS, a silent feed): fail closed.
 *
 * - `verifyRequest`: a fetch-standard `Request` (Hono, the Node/undici
 *   `Request`, any fetch handler) to a verified token or the refusal to send;
 * - `withToken`: wraps a fetch handler;
 * - `expressMiddleware`: Express (4 and 5), the token on `res.locals.mayfly`.
 */
import type { TLSSocket } from "node:tls";
import { VerifyError } from "../errors.js";
import { ALGORITHMS, type VerifiedToken, type Verifier } from "./verifier.js";

export interface GuardOptions {
  /** Scopes every request must carry. */
  scopes?: string[];
  /** The realm in `WWW-Authenticate`. */
  realm?: string;
}

/** A refusal as its status and headers (a JSON body gives the error for programs). */
export interface Refusal {
  status: number;
  headers: Record<string, string>;
  body: { error: string; error_description: string };
}

/** A quoted-string's content (RFC 9110 §5.6.4). */
function quote(s: string): string {
  return s.replace(/[\\"]/g, "\\$&").replace(/[\r\n]/g, " ");
}

/**
 * The `WWW-Authenticate` challenge: in the scheme the request used (RFC 9449
 * §7.1: a DPoP request is answered with a DPoP challenge), a Bearer one
 * naming the DPoP algorithms too.
 */
function challenge(
  scheme: "Bearer" | "DPoP",
  realm: string,
  error?: string,
  description?: string,
): string {
  const parts = [`realm="${quote(realm)}"`];
  if (error) {
    parts.push(`error="${error}"`);
    if (description) {
      parts.push(`error_description="${quote(description)}"`);
    }
  }
  if (scheme === "DPoP") {
    parts.push(`algs="${ALGORITHMS.join(" ")}"`);
    return `DPoP ${parts.join(", ")}`;
  }
  return `Bearer ${parts.join(", ")}, DPoP algs="${ALGORITHMS.join(" ")}"`;
}

function refusal(
  status: number,
  realm: string,
  error: string,
  description: string,
  scheme: "Bearer" | "DPoP" = "Bearer",
): Refusal {
  const headers: Record<string, string> = { "content-type": "application/json" };
  if (status === 401 || status === 403) {
    headers["www-authenticate"] = challenge(scheme, realm, error, description);
  }
  return { status, headers, body: { error, error_description: description } };
}

/** What a request presented: its scheme's token and, for DPoP, its proof. */
interface Presented {
  scheme: "bearer" | "dpop";
  token: string;
  proof: string | undefined;
}

function presented(
  authorization: string | null | undefined,
  dpop: string | null | undefined,
): Presented | undefined {
  const m = /^(Bearer|DPoP) +([A-Za-z0-9._~+/=-]+)\s*$/i.exec(authorization ?? "");
  if (!m?.[1] || !m[2]) {
    return undefined;
  }
  return {
    scheme: m[1].toLowerCase() === "dpop" ? "dpop" : "bearer",
    token: m[2],
    proof: dpop ?? undefined,
  };
}

/**
 * Checks one request's credentials. `url` is the URL the client sent to
 * (a DPoP proof's `htu`), `clientCert` the TLS client certificate if any.
 */
export async function check(
  verifier: Verifier,
  req: {
    method: string;
    url: string;
    authorization: string | null | undefined;
    dpop: string | null | undefined;
    clientCert?: Uint8Array | undefined;
  },
  opts: GuardOptions = {},
): Promise<VerifiedToken | Refusal> {
  const realm = opts.realm ?? "mayfly";
  const p = presented(req.authorization, req.dpop);
  if (p === undefined) {
    if (req.authorization) {
      return refusal(
        401,
        realm,
        "invalid_request",
        "the Authorization header is not a Bearer or DPoP token",
      );
    }
    const r = refusal(401, realm, "", "");
    r.headers["www-authenticate"] = challenge("Bearer", realm);
    return r;
  }
  const scheme = p.scheme === "dpop" ? "DPoP" : "Bearer";
  if (p.scheme === "dpop" && !p.proof) {
    return refusal(401, realm, "invalid_dpop_proof", "DPoP proof missing", scheme);
  }
  try {
    const verified = await verifier.verify(p.token, {
      ...(req.clientCert ? { clientCert: req.clientCert } : {}),
      ...(p.scheme === "dpop" && p.proof
        ? { dpop: { proof: p.proof, method: req.method, url: req.url } }
        : {}),
    });
    const missing = (opts.scopes ?? []).filter((s) => !verified.scopes.includes(s));
    if (missing.length > 0) {
      return refusal(403, realm, "insufficient_scope", `needs scope ${missing.join(" ")}`);
    }
    return verified;
  } catch (e) {
    if (!(e instanceof VerifyError)) {
      throw e;
    }
    if (e.serverSide) {
      return refusal(503, realm, "temporarily_unavailable", e.check);
    }
    // A proof that fails is the proof's fault; a bound token sent as
    // Bearer (dpop_required) is the token's.
    const error =
      scheme === "DPoP" && e.check.startsWith("dpop_") ? "invalid_dpop_proof" : "invalid_token";
    return refusal(401, realm, error, e.check, scheme);
  }
}

export function isRefusal(v: VerifiedToken | Refusal): v is Refusal {
  return "status" in v && "body" in v;
}

/** A fetch-standard request to its verified token, or the `Response` to send instead. */
export async function verifyRequest(
  verifier: Verifier,
  request: Request,
  opts: GuardOptions & { clientCert?: Uint8Array } = {},
): Promise<VerifiedToken | Response> {
  const got = await check(
    verifier,
    {
      method: request.method,
      url: request.url,
      authorization: request.headers.get("authorization"),
      dpop: request.headers.get("dpop"),
      clientCert: opts.clientCert,
    },
    opts,
  );
  if (isRefusal(got)) {
    return new Response(JSON.stringify(got.body), { status: got.status, headers: got.headers });
  }
  return got;
}

/** Wraps a fetch handler: it runs only for a verified token, which it is given. */
export function withToken(
  verifier: Verifier,
  handler: (request: Request, token: VerifiedToken) => Response | Promise<Response>,
  opts: GuardOptions = {},
): (request: Request) => Promise<Response> {
  return async (request) => {
    const got = await verifyRequest(verifier, request, opts);
    return got instanceof Response ? got : handler(request, got);
  };
}

/** Hono middleware (structurally typed): the token is `c.get("mayfly")`. */
export function honoMiddleware(verifier: Verifier, opts: GuardOptions = {}) {
  return async (
    c: { req: { raw: Request }; set(key: "mayfly", value: VerifiedToken): void },
    next: () => Promise<void>,
  ): Promise<Response | undefined> => {
    const got = await verifyRequest(verifier, c.req.raw, opts);
    if (got instanceof Response) {
      return got;
    }
    c.set("mayfly", got);
    await next();
    return undefined;
  };
}

/** The parts of Express's request and response this middleware uses. */
interface ExpressRequest {
  method: string;
  protocol: string;
  originalUrl: string;
  headers: Record<string, string | string[] | undefined>;
  get(name: string): string | undefined;
  host?: string;
  socket: unknown;
}
interface ExpressResponse {
  headersSent: boolean;
  locals: Record<string, unknown>;
  status(code: number): ExpressResponse;
  set(headers: Record<string, string>): ExpressResponse;
  json(body: unknown): unknown;
}

/**
 * Express middleware: a verified token goes to `res.locals.mayfly`; a
 * refusal is answered here. The DPoP `htu` is `publicUrl(req)`, by default
 * the request's protocol, Host and path as Express sees them (set Express's
 * `trust proxy` behind a proxy). The TLS client certificate, if any, is read
 * from the socket for certificate-bound tokens.
 */
export function expressMiddleware(
  verifier: Verifier,
  opts: GuardOptions & { publicUrl?: (req: ExpressRequest) => string } = {},
) {
  return (req: ExpressRequest, res: ExpressResponse, next: (err?: unknown) => void): void => {
    const socket = req.socket as Partial<TLSSocket>;
    const peer =
      typeof socket.getPeerCertificate === "function"
        ? socket.getPeerCertificate(false)
        : undefined;
    // req.host honours Express's `trust proxy`, as req.protocol does.
    const url =
      opts.publicUrl?.(req) ?? `${req.protocol}://${req.host ?? req.get("host")}${req.originalUrl}`;
    check(
      verifier,
      {
        method: req.method,
        url,
        authorization: req.get("authorization"),
        dpop: req.get("dpop"),
        clientCert: peer?.raw ? new Uint8Array(peer.raw) : undefined,
      },
      opts,
    )
      .then(
        (got) => {
          if (isRefusal(got)) {
            res.status(got.status).set(got.headers).json(got.body);
            return;
          }
          res.locals.mayfly = got;
          next();
        },
        (err: unknown) => next(err),
      )
      .catch((err: unknown) => {
        // Answering failed (e.g. headers already sent): Express's error path.
        if (!res.headersSent) {
          next(err);
        }
      });
  };
}
