/**
 * The values an agent gets back, as plain objects: dates as `Date`, states as
 * lower-case strings ("active", "pending"), secrets kept out of
 * `JSON.stringify` and `util.inspect`.
 */
import type { Timestamp } from "@bufbuild/protobuf/wkt";
import { timestampDate } from "@bufbuild/protobuf/wkt";
import type * as pb from "./gen/mayfly/v1/broker_pb.js";
import type * as tpb from "./gen/mayfly/v1/types_pb.js";
import {
  ApprovalState as PbApprovalState,
  TaskState as PbTaskState,
} from "./gen/mayfly/v1/types_pb.js";

export type TaskState = "active" | "completed" | "revoked" | "expired" | "unspecified";
export type ApprovalState =
  | "pending"
  | "approved"
  | "denied"
  | "consumed"
  | "expired"
  | "unspecified";

function enumName(names: Record<number, string>, value: number): string {
  return (names[value] ?? "UNSPECIFIED").toLowerCase();
}

function date(t: Timestamp | undefined): Date | undefined {
  return t ? timestampDate(t) : undefined;
}

/** A task as the broker last described it. */
export interface TaskInfo {
  taskId: string;
  agentId: string;
  intent: string;
  context: Record<string, string>;
  audiences: string[];
  scopes: string[];
  state: TaskState;
  createdAt: Date | undefined;
  expiresAt: Date | undefined;
  endedAt: Date | undefined;
  /** The task this one was delegated from; empty if none. */
  parentTaskId: string;
  /** The owners of the tasks above this one, the root's owner first. */
  delegatedBy: string[];
}

export function taskInfo(t: tpb.Task): TaskInfo {
  return {
    taskId: t.taskId,
    agentId: t.agentId,
    intent: t.intent,
    context: { ...t.context },
    audiences: [...(t.envelope?.audiences ?? [])],
    scopes: [...(t.envelope?.scopes ?? [])],
    state: enumName(PbTaskState, t.state) as TaskState,
    createdAt: date(t.createdAt),
    expiresAt: date(t.expiresAt),
    endedAt: date(t.endedAt),
    parentTaskId: t.parentTaskId,
    delegatedBy: [...t.delegatedBy],
  };
}

/** A request policy sent to an operator: single use, good for exactly the request it was asked for. */
export interface Approval {
  approvalId: string;
  agentId: string;
  taskId: string;
  taskIntent: string;
  state: ApprovalState;
  /** The policy that asked for approval. */
  policyId: string;
  audience: string;
  scopes: string[];
  /** For a tool call: "<upstream>/<tool>". */
  tool: string;
  createdAt: Date | undefined;
  expiresAt: Date | undefined;
  decidedBy: string;
  reason: string;
}

export function approval(a: tpb.Approval): Approval {
  return {
    approvalId: a.approvalId,
    agentId: a.agentId,
    taskId: a.taskId,
    taskIntent: a.taskIntent,
    state: enumName(PbApprovalState, a.state) as ApprovalState,
    policyId: a.policyId,
    audience: a.audience,
    scopes: [...a.scopes],
    tool: a.tool,
    createdAt: date(a.createdAt),
    expiresAt: date(a.expiresAt),
    decidedBy: a.decidedBy,
    reason: a.reason,
  };
}

const inspect = Symbol.for("nodejs.util.inspect.custom");

/**
 * Holds a secret string: `value` gives it; `toString`, `toJSON` and
 * `util.inspect` show "[redacted]", so logging the object that holds one
 * never prints it.
 */
export class Secret {
  readonly #value: string;
  constructor(value: string) {
    this.#value = value;
  }
  get value(): string {
    return this.#value;
  }
  toString(): string {
    return "[redacted]";
  }
  toJSON(): string {
    return "[redacted]";
  }
  [inspect](): string {
    return "Secret([redacted])";
  }
}

/** An access token: an RFC 9068 JWT for one audience. */
export interface Token {
  /** The compact JWS, held as a `Secret`. */
  readonly token: Secret;
  /** Also the token's `jti`. */
  readonly leaseId: string;
  readonly audience: string;
  readonly scopes: string[];
  readonly expiresAt: Date;
  /** "Bearer", or "DPoP" for a token bound to a DPoP key. */
  readonly tokenType: string;
}

export function token(t: pb.IssuedToken): Token {
  return {
    token: new Secret(t.token),
    leaseId: t.leaseId,
    audience: t.audience,
    scopes: [...t.scopes],
    expiresAt: date(t.expiresAt) ?? new Date(0),
    tokenType: t.tokenType,
  };
}

/** An X.509-SVID of a task, with the private key made for it here. */
export interface Certificate {
  readonly leaseId: string;
  readonly spiffeId: string;
  /** Hex, as `openssl x509 -serial` prints it. */
  readonly serial: string;
  readonly certificatePem: string;
  readonly chainPem: string;
  /** PKCS#8 PEM, held as a `Secret`. */
  readonly keyPem: Secret;
  readonly expiresAt: Date;
}

/** A login in a database the broker manages, dropped when its lease ends. */
export interface DatabaseLogin {
  readonly leaseId: string;
  readonly database: string;
  readonly user: string;
  readonly password: Secret;
  /** A connection URL with the user and password in it. */
  readonly dsn: Secret;
  readonly expiresAt: Date;
}

export function databaseLogin(d: pb.DatabaseCredential): DatabaseLogin {
  return {
    leaseId: d.leaseId,
    database: d.database,
    user: d.user,
    password: new Secret(d.password),
    dsn: new Secret(d.dsn),
    expiresAt: date(d.expiresAt) ?? new Date(0),
  };
}

/**
 * `value` with its `keyPem` kept out of `JSON.stringify` and `util.inspect`
 * (it stays readable as a property): for the plain objects that carry a
 * private key, such as a feed's configuration or an SVID.
 */
export function withHiddenKey<T extends { keyPem: string }>(value: T): T {
  const { keyPem, ...shown } = value;
  Object.defineProperty(value, "keyPem", { value: keyPem, enumerable: false });
  Object.defineProperty(value, inspect, {
    value: () => ({ ...shown, keyPem: "[redacted]" }),
    enumerable: false,
  });
  return value;
}
