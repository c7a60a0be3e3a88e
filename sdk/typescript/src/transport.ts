/**
 * gRPC to the broker: Connect's gRPC protocol over Node's HTTP/2, with the
 * broker's CA pinned and the caller's certificate presented when it has
 * one. One HTTP/2 session per transport, closed with it.
 */
import type { Interceptor, Transport } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { baseUrl } from "./config.js";

export interface TlsIdentity {
  broker: string;
  caPem: string;
  /** Empty when the caller proves itself otherwise (a workload token). */
  certPem: string;
  keyPem: string;
}

export interface OpenTransport {
  transport: Transport;
  /** Ends the HTTP/2 session and every call on it. */
  close(): void;
}

export function openTransport(id: TlsIdentity, interceptors: Interceptor[] = []): OpenTransport {
  const url = baseUrl(id.broker);
  const tls =
    id.certPem === "" ? { ca: id.caPem } : { ca: id.caPem, cert: id.certPem, key: id.keyPem };
  const sessions = new Http2SessionManager(url, { idleConnectionTimeoutMs: 60_000 }, tls);
  const transport = createGrpcTransport({
    baseUrl: url,
    sessionManager: sessions,
    interceptors,
  });
  return { transport, close: () => sessions.abort() };
}
