/**
 * Typed errors. Every refusal from the broker becomes one of these, chosen
 * from the status's `mayfly-error` metadata (never from its message), so an
 * agent can react to a policy's denial, an envelope it overstepped, a task
 * that ended or a rate limit without parsing text.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import type { Approval } from "./types.js";

/** Anything this package throws on purpose. */
export class MayflyError extends Error {
  override name = "MayflyError";
}

/** No usable broker connection: a profile, file or option is missing or wrong. */
export class ConfigError extends MayflyError {
  override name = "ConfigError";
}

/**
 * The broker refused or failed a call. `code` is the gRPC status code's name
 * (e.g. "PERMISSION_DENIED"), `error` the broker's stable name for the error
 * (e.g. "denied"), and `detail` its explanation for people.
 */
export class BrokerError extends MayflyError {
  override name = "BrokerError";
  constructor(
    readonly code: string,
    readonly error: string,
    readonly detail: string,
  ) {
    super(error ? `${detail} (${error})` : detail);
  }
}

/** A field was malformed or out of range (nothing was issued). */
export class InvalidRequest extends BrokerError {
  override name = "InvalidRequest";
}

/** The broker did not accept this caller's identity. */
export class Unauthenticated extends BrokerError {
  override name = "Unauthenticated";
}

/** Policy refused the request; `policyId` names the policy that did, or is undefined when none permitted it. */
export class PolicyDenied extends BrokerError {
  override name = "PolicyDenied";
  constructor(
    code: string,
    error: string,
    detail: string,
    readonly policyId: string | undefined,
  ) {
    super(code, error, detail);
  }
}

/** An audience or scope outside the task's envelope (or the parent's, for a delegation). */
export class OutsideEnvelope extends BrokerError {
  override name = "OutsideEnvelope";
}

/** The task is no longer active: completed, revoked or expired. */
export class TaskEnded extends BrokerError {
  override name = "TaskEnded";
}

/** No such task, lease, approval or database visible to this caller. */
export class NotFound extends BrokerError {
  override name = "NotFound";
}

/** An operator locked this agent out; nothing new is issued to it. */
export class AgentLocked extends BrokerError {
  override name = "AgentLocked";
}

/** Too many requests from this agent; `retryAfter` is in seconds. */
export class RateLimited extends BrokerError {
  override name = "RateLimited";
  constructor(
    code: string,
    error: string,
    detail: string,
    readonly retryAfter: number,
  ) {
    super(code, error, detail);
  }
}

/** The broker, its store or its audit trail cannot be reached; nothing was issued. Retrying later is safe. */
export class Unavailable extends BrokerError {
  override name = "Unavailable";
}

/** An operator refused the approval, or it expired before anyone decided. */
export class ApprovalDenied extends BrokerError {
  override name = "ApprovalDenied";
  constructor(
    code: string,
    error: string,
    detail: string,
    readonly approvalId: string,
    readonly reason: string | undefined,
  ) {
    super(code, error, detail);
  }
}

/**
 * Policy sends this request to an operator. `approval` is the pending
 * approval: wait for it (`broker.waitForApproval`), then repeat the request
 * with its `approvalId`, or pass `waitForApproval` to let the SDK do both.
 */
export class ApprovalRequired extends MayflyError {
  override name = "ApprovalRequired";
  constructor(readonly approval: Approval) {
    super(
      `approval ${approval.approvalId} required by policy "${approval.policyId}"; ` +
        "wait for an operator, then repeat the request with approvalId",
    );
  }

  get approvalId(): string {
    return this.approval.approvalId;
  }
}

/**
 * A token refused by `Verifier`. `check` names the check that failed (e.g.
 * "expired", "wrong_audience", "revoked", "feed_stale"); `serverSide` is true
 * when the verifier, not the token, is at fault (no JWKS, a silent feed):
 * answer 503 rather than 401.
 */
export class VerifyError extends MayflyError {
  override name = "VerifyError";
  constructor(
    readonly check: string,
    readonly detail: string,
    readonly serverSide = false,
  ) {
    super(`${check}: ${detail}`);
  }
}

type BrokerErrorClass = new (code: string, error: string, detail: string) => BrokerError;

const BY_NAME: Record<string, BrokerErrorClass> = {
  invalid: InvalidRequest,
  unauthenticated: Unauthenticated,
  outside_envelope: OutsideEnvelope,
  beyond_parent: OutsideEnvelope,
  task_not_active: TaskEnded,
  task_not_found: NotFound,
  lease_not_found: NotFound,
  approval_not_found: NotFound,
  database_not_found: NotFound,
  agent_not_found: NotFound,
  agent_locked: AgentLocked,
  unavailable: Unavailable,
  audit_unavailable: Unavailable,
  audit_broken: Unavailable,
  feed_unavailable: Unavailable,
  database_unavailable: Unavailable,
};

// Without the broker's metadata (a proxy's refusal, a dropped connection),
// the status code alone decides.
const BY_CODE: Partial<Record<Code, BrokerErrorClass>> = {
  [Code.Unavailable]: Unavailable,
  [Code.DeadlineExceeded]: Unavailable,
  [Code.Unauthenticated]: Unauthenticated,
  [Code.InvalidArgument]: InvalidRequest,
  [Code.NotFound]: NotFound,
};

/** "PERMISSION_DENIED" for Code.PermissionDenied: the name gRPC gives the code. */
function codeName(code: Code): string {
  return (Code[code] ?? "Unknown").replace(/([a-z])([A-Z])/g, "$1_$2").toUpperCase();
}

/** The error for a status the broker (or the transport) returned. */
export function fromStatus(code: Code, detail: string, metadata: Headers): BrokerError {
  const name = metadata.get("mayfly-error") ?? "";
  const message = detail || codeName(code).toLowerCase();
  const cname = codeName(code);
  if (name === "denied") {
    return new PolicyDenied(cname, name, message, metadata.get("mayfly-policy-id") ?? undefined);
  }
  if (name === "rate_limited") {
    const retryAfter = Number(metadata.get("retry-after") ?? "1");
    return new RateLimited(cname, name, message, Number.isFinite(retryAfter) ? retryAfter : 1);
  }
  if (name === "approval_denied") {
    return new ApprovalDenied(
      cname,
      name,
      message,
      metadata.get("mayfly-approval-id") ?? "",
      undefined,
    );
  }
  const cls = BY_NAME[name] ?? BY_CODE[code] ?? BrokerError;
  return new cls(cname, name, message);
}

/** The typed error for anything a broker call threw. */
export function fromCallError(e: unknown): MayflyError {
  if (e instanceof MayflyError) {
    return e;
  }
  const err = ConnectError.from(e);
  return fromStatus(err.code, err.rawMessage, err.metadata);
}
