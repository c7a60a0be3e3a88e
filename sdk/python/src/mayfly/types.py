"""What the broker hands out, as plain values. Secrets (a token, a private
key) never appear in `repr`, so logging one of these leaks nothing.
States are `str` enums: `TaskState.ACTIVE == "active"`."""

from __future__ import annotations

import datetime as dt
import time
from dataclasses import dataclass, field
from enum import Enum

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.timestamp_pb2 import Timestamp

from mayfly.v1 import broker_pb2, types_pb2


def _time(ts: Timestamp) -> dt.datetime:
    return ts.ToDatetime(tzinfo=dt.timezone.utc)


def _opt_time(msg: object, name: str) -> dt.datetime | None:
    has = getattr(msg, "HasField", None)
    if has is None or not has(name):
        return None
    ts: Timestamp = getattr(msg, name)
    return _time(ts)


def _state(enum: object, value: int, prefix: str) -> str:
    name: str = enum.Name(value)  # type: ignore[attr-defined]
    return name.removeprefix(prefix).lower()


class _StrEnum(str, Enum):
    """A state that is also its name as the broker and the CLI spell it."""

    def __str__(self) -> str:
        return str(self.value)


class TaskState(_StrEnum):
    """Where a task is in its life; only an active task gets credentials."""

    ACTIVE = "active"
    COMPLETED = "completed"
    REVOKED = "revoked"
    EXPIRED = "expired"


class ApprovalState(_StrEnum):
    """Where an approval is: waiting for an operator, decided, used to
    issue its credential, or let lapse."""

    PENDING = "pending"
    APPROVED = "approved"
    DENIED = "denied"
    CONSUMED = "consumed"
    EXPIRED = "expired"


@dataclass(frozen=True)
class TaskInfo:
    """A task as the broker last reported it."""

    task_id: str
    agent_id: str
    intent: str
    context: dict[str, str]
    audiences: list[str]
    scopes: list[str]
    state: TaskState
    created_at: dt.datetime
    expires_at: dt.datetime
    parent_task_id: str | None
    delegated_by: list[str]

    @classmethod
    def from_pb(cls, t: types_pb2.Task) -> TaskInfo:
        return cls(
            task_id=t.task_id,
            agent_id=t.agent_id,
            intent=t.intent,
            context=dict(t.context),
            audiences=list(t.envelope.audiences),
            scopes=list(t.envelope.scopes),
            state=TaskState(_state(types_pb2.TaskState, t.state, "TASK_STATE_")),
            created_at=_time(t.created_at),
            expires_at=_time(t.expires_at),
            parent_task_id=t.parent_task_id or None,
            delegated_by=list(t.delegated_by),
        )


@dataclass(frozen=True)
class Approval:
    """A request policy sent to an operator. `kind` is what it would
    issue: "jwt" or "x509"."""

    approval_id: str
    task_id: str
    kind: str
    audience: str
    scopes: list[str]
    state: ApprovalState
    policy_id: str
    expires_at: dt.datetime | None
    decided_by: str | None
    reason: str | None

    @classmethod
    def from_pb(cls, a: types_pb2.Approval) -> Approval:
        return cls(
            approval_id=a.approval_id,
            task_id=a.task_id,
            kind=_state(types_pb2.LeaseKind, a.kind, "LEASE_KIND_"),
            audience=a.audience,
            scopes=list(a.scopes),
            state=ApprovalState(_state(types_pb2.ApprovalState, a.state, "APPROVAL_STATE_")),
            policy_id=a.policy_id,
            expires_at=_opt_time(a, "expires_at"),
            decided_by=a.decided_by or None,
            reason=a.reason or None,
        )


@dataclass(frozen=True)
class Token:
    """A JWT access token of a task. `value` is the compact JWS: send it as
    `Authorization: Bearer …` (or `DPoP …` when `token_type` is "DPoP")
    and nowhere else."""

    value: str = field(repr=False)
    lease_id: str
    audience: str
    scopes: list[str]
    token_type: str
    expires_at: dt.datetime

    @classmethod
    def from_pb(cls, t: broker_pb2.IssuedToken) -> Token:
        return cls(
            value=t.token,
            lease_id=t.lease_id,
            audience=t.audience,
            scopes=list(t.scopes),
            token_type=t.token_type,
            expires_at=_time(t.expires_at),
        )

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_at.timestamp() - (time.time() if now is None else now)

    @property
    def authorization(self) -> str:
        """The `Authorization` header value."""
        return f"{self.token_type} {self.value}"


@dataclass(frozen=True)
class DatabaseLogin:
    """A login made in a database for this task (a PostgreSQL role, a Redis
    ACL user), dropped from it when the lease ends. `password` and `dsn`
    (a URL with both in it) exist only here: the broker keeps neither, and
    neither is in the repr."""

    lease_id: str
    database: str
    user: str
    password: str = field(repr=False)
    dsn: str = field(repr=False)
    expires_at: dt.datetime

    @classmethod
    def from_pb(cls, c: broker_pb2.DatabaseCredential) -> DatabaseLogin:
        return cls(
            lease_id=c.lease_id,
            database=c.database,
            user=c.user,
            password=c.password,
            dsn=c.dsn,
            expires_at=_time(c.expires_at),
        )

    def seconds_left(self, now: float | None = None) -> float:
        return self.expires_at.timestamp() - (time.time() if now is None else now)


@dataclass(frozen=True)
class Certificate:
    """An X.509-SVID of a task: its SPIFFE ID is the agent's with
    `/task/<task_id>` appended. The private key was made here and never
    left this process; `key_pem()` gives it (PKCS#8, unencrypted) for a TLS
    stack that wants a file."""

    certificate_pem: str
    chain_pem: str
    private_key: ec.EllipticCurvePrivateKey = field(repr=False)
    lease_id: str
    serial: str
    spiffe_id: str
    expires_at: dt.datetime

    def key_pem(self) -> bytes:
        return self.private_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    @property
    def full_chain_pem(self) -> str:
        """The leaf and the CA(s) that issued it, as a TLS client presents them."""
        return self.certificate_pem + self.chain_pem
