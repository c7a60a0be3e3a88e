/**
 * Mayfly for TypeScript agent runtimes: task-scoped credentials from a
 * Mayfly broker (`connect`, `Broker`, `Task`), and, from
 * "@mayfly/sdk/verify", token verification for the services they call.
 */
export {
  ApprovalStillPending,
  audienceFor,
  Broker,
  connect,
  type FetchOptions,
  NoAudience,
  Task,
  type TaskOptions,
  type TokenOptions,
} from "./client.js";
export { Connection, type ConnectOptions, resolve } from "./config.js";
export { DpopKey } from "./dpop.js";
export {
  AgentLocked,
  ApprovalDenied,
  ApprovalRequired,
  BrokerError,
  ConfigError,
  InvalidRequest,
  MayflyError,
  NotFound,
  OutsideEnvelope,
  PolicyDenied,
  RateLimited,
  TaskEnded,
  Unauthenticated,
  Unavailable,
  VerifyError,
} from "./errors.js";
export {
  type Approval,
  type ApprovalState,
  type Certificate,
  type DatabaseLogin,
  Secret,
  type TaskInfo,
  type TaskState,
  type Token,
} from "./types.js";
export { WorkloadApi, type X509Svid } from "./workload-api.js";
export { WorkloadToken } from "./workload-token.js";
