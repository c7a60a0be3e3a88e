"""Typed exceptions. Every refusal from the broker becomes one of these,
chosen from the status's `mayfly-error` metadata (never from its message),
so an agent can react to a policy's denial, an envelope it overstepped, a
task that ended or a rate limit without parsing text."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from mayfly.types import Approval


class MayflyError(Exception):
    """Anything this package raises on purpose."""


class ConfigError(MayflyError):
    """No usable broker connection: a profile, file or argument is missing
    or wrong. The message says which and what was expected."""


class BrokerError(MayflyError):
    """The broker refused or failed a call.

    `code` is the gRPC status code's name (e.g. "PERMISSION_DENIED"),
    `error` the broker's stable name for the error (e.g. "denied"), and
    `message` its explanation for people."""

    def __init__(self, code: str, error: str, message: str) -> None:
        super().__init__(f"{message} ({error})" if error else message)
        self.code = code
        self.error = error
        self.message = message


class InvalidRequest(BrokerError):
    """A field was malformed or out of range (nothing was issued)."""


class Unauthenticated(BrokerError):
    """The broker did not accept this caller's identity."""


class PolicyDenied(BrokerError):
    """Policy refused the request. `policy_id` names the policy that did,
    or is None when no policy permitted it (the default deny)."""

    def __init__(self, code: str, error: str, message: str, policy_id: str | None) -> None:
        super().__init__(code, error, message)
        self.policy_id = policy_id


class OutsideEnvelope(BrokerError):
    """An audience or scope outside the task's envelope (or, for a
    delegation, outside the parent's)."""


class TaskEnded(BrokerError):
    """The task is no longer active: completed, revoked or expired."""


class NotFound(BrokerError):
    """No such task, lease or approval visible to this caller."""


class AgentLocked(BrokerError):
    """An operator locked this agent out; nothing new is issued to it."""


class ApprovalRequired(MayflyError):
    """Policy sends this request to an operator. `approval` is the pending
    approval: wait for it (`wait_for_approval`), then repeat the request
    with its `approval_id`."""

    def __init__(self, approval: Approval) -> None:
        super().__init__(
            f"approval {approval.approval_id} required by policy {approval.policy_id!r}; "
            "wait for an operator, then repeat the request with approval_id"
        )
        self.approval = approval

    @property
    def approval_id(self) -> str:
        return self.approval.approval_id


class ApprovalDenied(BrokerError):
    """An operator refused the approval (`reason` says why, if they did),
    or it expired before anyone decided."""

    def __init__(
        self, code: str, error: str, message: str, approval_id: str, reason: str | None
    ) -> None:
        super().__init__(code, error, message)
        self.approval_id = approval_id
        self.reason = reason


class RateLimited(BrokerError):
    """Too many requests from this agent; `retry_after` is in seconds."""

    def __init__(self, code: str, error: str, message: str, retry_after: float) -> None:
        super().__init__(code, error, message)
        self.retry_after = retry_after


class Unavailable(BrokerError):
    """The broker, its store or its audit trail cannot be reached; nothing
    was issued. Retrying later is safe."""


class VerifyError(MayflyError):
    """A token was refused by `Verifier`. `check` names the check that
    failed (e.g. "expired", "wrong_audience", "revoked", "feed_stale");
    `server_side` is true when the verifier, not the token, is at fault (no
    JWKS, a silent feed): answer 503 rather than 401."""

    def __init__(self, check: str, detail: str, *, server_side: bool = False) -> None:
        super().__init__(f"{check}: {detail}")
        self.check = check
        self.detail = detail
        self.server_side = server_side


_BY_NAME: dict[str, type[BrokerError]] = {
    "invalid": InvalidRequest,
    "unauthenticated": Unauthenticated,
    "outside_envelope": OutsideEnvelope,
    "beyond_parent": OutsideEnvelope,
    "task_not_active": TaskEnded,
    "task_not_found": NotFound,
    "lease_not_found": NotFound,
    "approval_not_found": NotFound,
    "agent_locked": AgentLocked,
    "unavailable": Unavailable,
    "audit_unavailable": Unavailable,
    "audit_broken": Unavailable,
    "feed_unavailable": Unavailable,
}

# Without the broker's metadata (a proxy's refusal, a dropped connection),
# the status code alone decides.
_BY_CODE: dict[grpc.StatusCode, type[BrokerError]] = {
    grpc.StatusCode.UNAVAILABLE: Unavailable,
    grpc.StatusCode.DEADLINE_EXCEEDED: Unavailable,
    grpc.StatusCode.UNAUTHENTICATED: Unauthenticated,
    grpc.StatusCode.INVALID_ARGUMENT: InvalidRequest,
    grpc.StatusCode.NOT_FOUND: NotFound,
}


def _metadata(pairs: Sequence[tuple[str, str | bytes]] | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for key, value in pairs or ():
        out[key.lower()] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return out


def from_status(
    code: grpc.StatusCode, details: str | None, trailers: Sequence[tuple[str, str | bytes]] | None
) -> BrokerError:
    """The exception for a status the broker (or the channel) returned."""
    meta = _metadata(trailers)
    name = meta.get("mayfly-error", "")
    message = details or code.name.lower()
    code_name = code.name
    if name == "denied":
        return PolicyDenied(code_name, name, message, meta.get("mayfly-policy-id"))
    if name == "rate_limited":
        try:
            retry_after = float(meta.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        return RateLimited(code_name, name, message, retry_after)
    if name == "approval_denied":
        # The operator's reason is in the message for people; a program
        # reads it from the approval (`wait_for_approval`).
        return ApprovalDenied(code_name, name, message, meta.get("mayfly-approval-id", ""), None)
    cls = _BY_NAME.get(name) or _BY_CODE.get(code, BrokerError)
    return cls(code_name, name, message)


def from_rpc_error(e: grpc.RpcError) -> BrokerError:
    """The exception for a failed call of either grpc API (sync or aio)."""
    call = e if isinstance(e, grpc.Call) else None
    aio = e if isinstance(e, grpc.aio.AioRpcError) else None
    if aio is not None:
        trailers = [(k, v) for k, v in (aio.trailing_metadata() or ())]
        return from_status(aio.code(), aio.details(), trailers)
    if call is not None:
        trailers = [(k, v) for k, v in (call.trailing_metadata() or ())]
        return from_status(call.code(), call.details(), trailers)
    return Unavailable("UNKNOWN", "", str(e))
