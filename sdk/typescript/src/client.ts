/**
 * The agent's side: a connection to the broker, tasks as blocks that
 * complete when left (also on a throw), and the credentials issued under
 * them.
 *
 *     await using broker = connect();
 *     await using task = await broker.startTask("summarise ticket 42", {
 *       audiences: ["https://api.example.com"], scopes: ["read:tickets"],
 *     });
 *     const token = await task.token("https://api.example.com", ["read:tickets"]);
 */
import { create } from "@bufbuild/protobuf";
import type { Client, Interceptor } from "@connectrpc/connect";
import { createClient } from "@connectrpc/connect";
import { type Connection, type ConnectOptions, resolve } from "./config.js";
import { newCsr } from "./csr.js";
import type { DpopKey } from "./dpop.js";
import {
  ApprovalDenied,
  ApprovalRequired,
  BrokerError,
  fromCallError,
  MayflyError,
  TaskEnded,
} from "./errors.js";
import {
  Broker as BrokerService,
  CompleteTaskRequestSchema,
  DelegateTaskRequestSchema,
  GetTaskRequestSchema,
  IssueDatabaseCredentialRequestSchema,
  IssueTokenRequestSchema,
  SignCertificateRequestSchema,
  StartTaskRequestSchema,
  UpdateTaskContextRequestSchema,
  WaitApprovalRequestSchema,
} from "./gen/mayfly/v1/broker_pb.js";
import type * as pb from "./gen/mayfly/v1/types_pb.js";
import { type OpenTransport, openTransport } from "./transport.js";
import {
  type Approval,
  approval,
  type Certificate,
  type DatabaseLogin,
  databaseLogin,
  Secret,
  type TaskInfo,
  type Token,
  taskInfo,
  token as tokenOf,
} from "./types.js";
import { RENEWABLE } from "./workload-token.js";

/** Connects to the broker the options, the environment or the profile name (see `config.ts`). No I/O happens until the first call. */
export function connect(opts: ConnectOptions = {}): Broker {
  return new Broker(resolve(opts));
}

export interface TaskOptions {
  /** Every audience the task may need tokens for (at least one). */
  audiences: string[];
  /** Every scope the task may need. */
  scopes?: string[];
  /** Facts policy decides on, e.g. { environment: "staging" }. */
  context?: Record<string, string>;
  /** Omitted: the broker's default. */
  ttlSeconds?: number;
}

export interface TokenOptions {
  /** Bind the token to this agent's certificate (RFC 8705); by default, if the agent has one. */
  bind?: boolean;
  /** Bind the token to this DPoP key instead (RFC 9449). */
  dpop?: DpopKey;
  ttlSeconds?: number;
  /** Collects a request an operator approved. */
  approvalId?: string;
  /** When policy asks an operator: wait up to this many seconds and collect it, instead of throwing `ApprovalRequired`. */
  waitForApproval?: number;
}

/** One agent's connection to the broker. */
export class Broker implements AsyncDisposable {
  #connection: Connection;
  #open: OpenTransport;
  #client: Client<typeof BrokerService>;
  readonly #unsubscribe: (() => void) | undefined;

  constructor(connection: Connection) {
    this.#connection = connection;
    [this.#open, this.#client] = Broker.#dial(connection);
    // A rotated SVID: new calls go over a session with the new certificate;
    // calls already running on the old one finish, which is then closed.
    this.#unsubscribe = connection.workloadApi?.onUpdate((svid) => {
      const old = this.#open;
      this.#connection = this.#connection.withCertificate(svid.certPem, svid.keyPem);
      [this.#open, this.#client] = Broker.#dial(this.#connection);
      setTimeout(() => old.close(), 30_000).unref();
    });
  }

  static #dial(connection: Connection): [OpenTransport, Client<typeof BrokerService>] {
    const source = connection.workloadToken;
    const interceptors: Interceptor[] = [];
    if (source !== undefined) {
      interceptors.push((next) => async (req) => {
        req.header.set("authorization", `Bearer ${await source.current()}`);
        return next(req);
      });
    }
    const open = openTransport(connection, interceptors);
    return [open, createClient(BrokerService, open.transport)];
  }

  /** The connection in use: the broker, the CA and the agent's identity. */
  get connection(): Connection {
    return this.#connection;
  }

  /**
   * Runs one RPC, its refusal thrown as a typed error. An agent on a
   * workload token the broker says was used or expired fetches a fresh one
   * and tries once more.
   */
  async call<T>(rpc: (client: Client<typeof BrokerService>) => Promise<T>): Promise<T> {
    try {
      return await rpc(this.#client);
    } catch (e) {
      const err = fromCallError(e);
      const source = this.connection.workloadToken;
      if (source === undefined || !(err instanceof BrokerError) || !RENEWABLE.has(err.error)) {
        throw err;
      }
      await source.renew();
      try {
        return await rpc(this.#client);
      } catch (again) {
        throw fromCallError(again);
      }
    }
  }

  /** Opens a task. Leave it with `await using`, or call `complete()`. */
  async startTask(intent: string, opts: TaskOptions): Promise<Task> {
    const request = create(StartTaskRequestSchema, {
      intent,
      audiences: opts.audiences,
      scopes: opts.scopes ?? [],
      context: opts.context ?? {},
      ttlSeconds: BigInt(Math.max(0, Math.round(opts.ttlSeconds ?? 0))),
    });
    const got = await this.call((c) => c.startTask(request));
    return new Task(this, taskInfo(got));
  }

  /** Opens a task, runs `body` with it, and completes it however `body` ends. */
  async withTask<T>(
    intent: string,
    opts: TaskOptions,
    body: (task: Task) => Promise<T>,
  ): Promise<T> {
    await using task = await this.startTask(intent, opts);
    return await body(task);
  }

  /** A task this agent already owns, e.g. one delegated to it. */
  async attach(taskId: string): Promise<Task> {
    const got = await this.call((c) => c.getTask(create(GetTaskRequestSchema, { taskId })));
    return new Task(this, taskInfo(got));
  }

  /**
   * Waits until an operator decides. Returns the approved approval (repeat
   * the request with its `approvalId`); throws `ApprovalDenied` if refused
   * or expired, and `ApprovalStillPending` after `timeoutSeconds`.
   */
  async waitForApproval(approvalId: string, timeoutSeconds = 300): Promise<Approval> {
    const deadline = Date.now() + timeoutSeconds * 1000;
    for (;;) {
      const left = (deadline - Date.now()) / 1000;
      const waitSeconds = Math.max(1, Math.min(60, Math.floor(left)));
      const got = approval(
        await this.call((c) =>
          c.waitApproval(create(WaitApprovalRequestSchema, { approvalId, waitSeconds })),
        ),
      );
      if (got.state === "approved") {
        return got;
      }
      if (got.state !== "pending") {
        throw new ApprovalDenied(
          "PERMISSION_DENIED",
          `approval_${got.state}`,
          `approval ${approvalId} is ${got.state}` +
            (got.decidedBy ? ` by ${got.decidedBy}` : "") +
            (got.reason ? `: ${got.reason}` : ""),
          approvalId,
          got.reason || undefined,
        );
      }
      if (left <= 1) {
        throw new ApprovalStillPending(got);
      }
    }
  }

  /**
   * Sends an issuing request; an answer that is an approval throws
   * `ApprovalRequired`, or with `waitForApproval` waits for the operator
   * and sends the request again with the approval's id.
   */
  async issue<R extends { approval?: pb.Approval }, Q extends { approvalId: string }>(
    request: Q,
    rpc: (client: Client<typeof BrokerService>, request: Q) => Promise<R>,
    waitForApproval: number | undefined,
  ): Promise<[R, number]> {
    let sentAt = Date.now();
    const got = await this.call((c) => rpc(c, request));
    if (got.approval === undefined) {
      return [got, sentAt];
    }
    const pending = approval(got.approval);
    if (waitForApproval === undefined) {
      throw new ApprovalRequired(pending);
    }
    await this.waitForApproval(pending.approvalId, waitForApproval);
    request.approvalId = pending.approvalId;
    sentAt = Date.now();
    const again = await this.call((c) => rpc(c, request));
    if (again.approval !== undefined) {
      throw new ApprovalRequired(approval(again.approval));
    }
    return [again, sentAt];
  }

  /** Closes the connection; calls still running fail. */
  close(): void {
    this.#unsubscribe?.();
    this.#open.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    this.close();
  }
}

/** An approval still pending when `waitForApproval` gave up. */
export class ApprovalStillPending extends MayflyError {
  override name = "ApprovalStillPending";
  constructor(readonly approval: Approval) {
    super(`approval ${approval.approvalId} is still pending`);
  }
}

/**
 * A cached token is handed out again until less than a fifth of its life
 * (at most 30 s, at least 1 s) is left, so a request never leaves with a
 * token about to expire.
 */
export function stillFresh(expiresAt: Date, issuedAt: number, now: number): boolean {
  const life = expiresAt.getTime() - issuedAt;
  const margin = Math.min(30_000, Math.max(1_000, life / 5));
  return expiresAt.getTime() - now > margin;
}

/** The task audience a request to `url` is for: the longest audience that is the URL's origin plus a path prefix of it; undefined when none covers it. */
export function audienceFor(url: string | URL, audiences: readonly string[]): string | undefined {
  const u = new URL(url);
  let best: string | undefined;
  for (const aud of audiences) {
    let a: URL;
    try {
      a = new URL(aud);
    } catch {
      continue;
    }
    if (a.origin !== u.origin || a.origin === "null") {
      continue;
    }
    const path = a.pathname.replace(/\/+$/, "");
    if (path && u.pathname !== path && !u.pathname.startsWith(`${path}/`)) {
      continue;
    }
    if (best === undefined || aud.length > best.length) {
      best = aud;
    }
  }
  return best;
}

/** A request's URL is under none of the task's audiences: no token was sent. */
export class NoAudience extends MayflyError {
  override name = "NoAudience";
}

export interface FetchOptions {
  /** The token's scopes; by default the task's. */
  scopes?: string[];
  /** Sign each request with this DPoP key (and bind the token to it). */
  dpop?: DpopKey;
  bind?: boolean;
}

/** One task of the agent: what the broker last said of it, and the tokens issued under it. */
export class Task implements AsyncDisposable {
  #info: TaskInfo;
  readonly #tokens = new Map<string, { token: Token; issuedAt: number }>();
  readonly #inflight = new Map<string, Promise<Token>>();
  /** Moved on by `complete()`: tokens asked for before it are not cached after. */
  #generation = 0;

  constructor(
    readonly broker: Broker,
    info: TaskInfo,
  ) {
    this.#info = info;
  }

  get info(): TaskInfo {
    return this.#info;
  }

  get taskId(): string {
    return this.#info.taskId;
  }

  /**
   * A token for `audience` with `scopes`, from the cache while it has enough
   * life left. It is bound to this agent's certificate if the agent has one
   * (`bind: false` asks for a bearer token), or to `dpop`'s key.
   */
  async token(audience: string, scopes: string[] = [], opts: TokenOptions = {}): Promise<Token> {
    const bind = opts.dpop === undefined && (opts.bind ?? this.broker.connection.hasCertificate);
    const binding = opts.dpop ? opts.dpop.jkt : String(bind);
    const key = JSON.stringify([audience, [...new Set(scopes)].sort(), binding]);
    if (opts.approvalId === undefined) {
      const held = this.#tokens.get(key);
      if (held && stillFresh(held.token.expiresAt, held.issuedAt, Date.now())) {
        return held.token;
      }
      // One request at a time per key: a second caller gets the first's token.
      const running = this.#inflight.get(key);
      if (running) {
        return running;
      }
    }
    const request = create(IssueTokenRequestSchema, {
      taskId: this.taskId,
      audience,
      scopes,
      ttlSeconds: BigInt(Math.max(0, Math.round(opts.ttlSeconds ?? 0))),
      bindToClientCert: bind,
      approvalId: opts.approvalId ?? "",
      dpopJwk: opts.dpop ? JSON.stringify(opts.dpop.publicJwk) : "",
    });
    const generation = this.#generation;
    const issuing: Promise<Token> = this.broker
      .issue(request, (c, r) => c.issueToken(r), opts.waitForApproval)
      .then(([got, issuedAt]) => {
        const t = tokenOf(got);
        // A token that arrives after the task completed is not kept.
        if (generation === this.#generation) {
          this.#tokens.set(key, { token: t, issuedAt });
        }
        return t;
      })
      .finally(() => {
        if (this.#inflight.get(key) === issuing) {
          this.#inflight.delete(key);
        }
      });
    if (opts.approvalId === undefined) {
      this.#inflight.set(key, issuing);
    }
    return issuing;
  }

  /** Drops a cached token (e.g. one a service refused). */
  forget(leaseId: string): void {
    for (const [k, v] of this.#tokens) {
      if (v.token.leaseId === leaseId) {
        this.#tokens.delete(k);
      }
    }
  }

  /** An X.509-SVID of this task. The P-256 key is made here; only a CSR is sent. */
  async certificate(opts: { ttlSeconds?: number; approvalId?: string } = {}): Promise<Certificate> {
    const { key, csr } = newCsr();
    const request = create(SignCertificateRequestSchema, {
      taskId: this.taskId,
      csr,
      ttlSeconds: BigInt(Math.max(0, Math.round(opts.ttlSeconds ?? 0))),
      approvalId: opts.approvalId ?? "",
    });
    const [got] = await this.broker.issue(request, (c, r) => c.signCertificate(r), undefined);
    return {
      leaseId: got.leaseId,
      spiffeId: got.spiffeId,
      serial: got.serial,
      certificatePem: got.certificatePem,
      chainPem: got.chainPem,
      keyPem: new Secret(key.export({ type: "pkcs8", format: "pem" }) as string),
      expiresAt: got.expiresAt ? new Date(Number(got.expiresAt.seconds) * 1000) : new Date(0),
    };
  }

  /**
   * A login in `database` (its configured name, e.g. "postgres://orders")
   * granted `scopes`, dropped from the database when its lease ends. Each
   * call makes a new login (a login is a secret; nothing is cached).
   */
  async databaseLogin(
    database: string,
    scopes: string[],
    opts: { ttlSeconds?: number; approvalId?: string; waitForApproval?: number } = {},
  ): Promise<DatabaseLogin> {
    const request = create(IssueDatabaseCredentialRequestSchema, {
      taskId: this.taskId,
      database,
      scopes,
      ttlSeconds: BigInt(Math.max(0, Math.round(opts.ttlSeconds ?? 0))),
      approvalId: opts.approvalId ?? "",
    });
    const [got] = await this.broker.issue(
      request,
      (c, r) => c.issueDatabaseCredential(r),
      opts.waitForApproval,
    );
    return databaseLogin(got);
  }

  /** Changes the task's context; returns the leases the broker revoked because policy no longer allows them. */
  async updateContext(change: {
    set?: Record<string, string>;
    remove?: string[];
  }): Promise<string[]> {
    const request = create(UpdateTaskContextRequestSchema, {
      taskId: this.taskId,
      set: change.set ?? {},
      remove: change.remove ?? [],
    });
    const got = await this.broker.call((c) => c.updateTaskContext(request));
    if (got.task) {
      this.#info = taskInfo(got.task);
    }
    for (const lease of got.revokedLeases) {
      this.forget(lease);
    }
    return [...got.revokedLeases];
  }

  /** Hands part of this task to agent `to` (a SPIFFE ID): a new task it owns, within this one's envelope, ending with it. */
  async delegate(
    to: string,
    opts: { intent: string; audiences: string[]; scopes: string[]; ttlSeconds?: number },
  ): Promise<TaskInfo> {
    const request = create(DelegateTaskRequestSchema, {
      parentTaskId: this.taskId,
      delegateId: to,
      intent: opts.intent,
      audiences: opts.audiences,
      scopes: opts.scopes,
      ttlSeconds: BigInt(Math.max(0, Math.round(opts.ttlSeconds ?? 0))),
    });
    return taskInfo(await this.broker.call((c) => c.delegateTask(request)));
  }

  /** The task as the broker now has it. */
  async refresh(): Promise<TaskInfo> {
    const got = await this.broker.call((c) =>
      c.getTask(create(GetTaskRequestSchema, { taskId: this.taskId })),
    );
    this.#info = taskInfo(got);
    return this.#info;
  }

  /** Ends the task; returns the lease ids revoked. Completing an ended task does nothing. */
  async complete(): Promise<string[]> {
    this.#generation += 1;
    this.#tokens.clear();
    this.#inflight.clear();
    try {
      const done = await this.broker.call((c) =>
        c.completeTask(create(CompleteTaskRequestSchema, { taskId: this.taskId })),
      );
      if (done.task) {
        this.#info = taskInfo(done.task);
      }
      return [...done.revokedLeases];
    } catch (e) {
      if (e instanceof TaskEnded) {
        return [];
      }
      throw e;
    }
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.complete();
  }

  /**
   * `fetch` with this task's token for the audience the URL is under (the
   * longest envelope audience that is its origin and a path prefix); a URL
   * no audience covers throws `NoAudience` and sends nothing. With `dpop`,
   * each request carries a fresh proof. A 401 with `error="invalid_token"`
   * drops the token and retries once with a fresh one. Redirects are not
   * followed (a 3xx is returned as it is), so the token never travels on to
   * a path or host no audience covers.
   */
  async fetch(
    input: string | URL,
    init: RequestInit = {},
    opts: FetchOptions = {},
  ): Promise<Response> {
    const url = new URL(input);
    const aud = audienceFor(url, this.#info.audiences);
    if (aud === undefined) {
      throw new NoAudience(
        `${url.origin}${url.pathname} is under none of the task's audiences ${JSON.stringify(this.#info.audiences)}; no token was sent`,
      );
    }
    const scopes = opts.scopes ?? this.#info.scopes;
    const method = (init.method ?? "GET").toUpperCase();
    const send = async (): Promise<[Response, Token]> => {
      const t = await this.token(aud, scopes, opts);
      const headers = new Headers(init.headers);
      if (opts.dpop) {
        headers.set("authorization", `DPoP ${t.token.value}`);
        headers.set("dpop", await opts.dpop.proof(method, url, t.token.value));
      } else {
        headers.set("authorization", `Bearer ${t.token.value}`);
      }
      // Redirects are not followed: a token goes only where audienceFor sent it.
      return [await fetch(url, { ...init, method, headers, redirect: "manual" }), t];
    };
    const [first, used] = await send();
    const refused =
      first.status === 401 &&
      (first.headers.get("www-authenticate") ?? "").includes("invalid_token");
    if (!refused || init.body instanceof ReadableStream) {
      return first;
    }
    this.forget(used.leaseId);
    await first.body?.cancel();
    return (await send())[0];
  }
}
