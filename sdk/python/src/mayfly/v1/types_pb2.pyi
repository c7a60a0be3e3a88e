import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_STATE_UNSPECIFIED: _ClassVar[TaskState]
    TASK_STATE_ACTIVE: _ClassVar[TaskState]
    TASK_STATE_COMPLETED: _ClassVar[TaskState]
    TASK_STATE_REVOKED: _ClassVar[TaskState]
    TASK_STATE_EXPIRED: _ClassVar[TaskState]

class LeaseKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_KIND_UNSPECIFIED: _ClassVar[LeaseKind]
    LEASE_KIND_TASK: _ClassVar[LeaseKind]
    LEASE_KIND_JWT: _ClassVar[LeaseKind]
    LEASE_KIND_X509: _ClassVar[LeaseKind]
    LEASE_KIND_DATABASE_LOGIN: _ClassVar[LeaseKind]

class LeaseState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LEASE_STATE_UNSPECIFIED: _ClassVar[LeaseState]
    LEASE_STATE_ACTIVE: _ClassVar[LeaseState]
    LEASE_STATE_REVOKED: _ClassVar[LeaseState]
    LEASE_STATE_EXPIRED: _ClassVar[LeaseState]

class RevocationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVOCATION_REASON_UNSPECIFIED: _ClassVar[RevocationReason]
    REVOCATION_REASON_TASK_COMPLETED: _ClassVar[RevocationReason]
    REVOCATION_REASON_TASK_REVOKED: _ClassVar[RevocationReason]
    REVOCATION_REASON_CONTEXT_CHANGED: _ClassVar[RevocationReason]
    REVOCATION_REASON_OPERATOR: _ClassVar[RevocationReason]
    REVOCATION_REASON_AGENT_REVOKED: _ClassVar[RevocationReason]
    REVOCATION_REASON_PARENT_REVOKED: _ClassVar[RevocationReason]
    REVOCATION_REASON_TOKEN_REVOKED: _ClassVar[RevocationReason]

class ApprovalState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPROVAL_STATE_UNSPECIFIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_PENDING: _ClassVar[ApprovalState]
    APPROVAL_STATE_APPROVED: _ClassVar[ApprovalState]
    APPROVAL_STATE_DENIED: _ClassVar[ApprovalState]
    APPROVAL_STATE_CONSUMED: _ClassVar[ApprovalState]
    APPROVAL_STATE_EXPIRED: _ClassVar[ApprovalState]
TASK_STATE_UNSPECIFIED: TaskState
TASK_STATE_ACTIVE: TaskState
TASK_STATE_COMPLETED: TaskState
TASK_STATE_REVOKED: TaskState
TASK_STATE_EXPIRED: TaskState
LEASE_KIND_UNSPECIFIED: LeaseKind
LEASE_KIND_TASK: LeaseKind
LEASE_KIND_JWT: LeaseKind
LEASE_KIND_X509: LeaseKind
LEASE_KIND_DATABASE_LOGIN: LeaseKind
LEASE_STATE_UNSPECIFIED: LeaseState
LEASE_STATE_ACTIVE: LeaseState
LEASE_STATE_REVOKED: LeaseState
LEASE_STATE_EXPIRED: LeaseState
REVOCATION_REASON_UNSPECIFIED: RevocationReason
REVOCATION_REASON_TASK_COMPLETED: RevocationReason
REVOCATION_REASON_TASK_REVOKED: RevocationReason
REVOCATION_REASON_CONTEXT_CHANGED: RevocationReason
REVOCATION_REASON_OPERATOR: RevocationReason
REVOCATION_REASON_AGENT_REVOKED: RevocationReason
REVOCATION_REASON_PARENT_REVOKED: RevocationReason
REVOCATION_REASON_TOKEN_REVOKED: RevocationReason
APPROVAL_STATE_UNSPECIFIED: ApprovalState
APPROVAL_STATE_PENDING: ApprovalState
APPROVAL_STATE_APPROVED: ApprovalState
APPROVAL_STATE_DENIED: ApprovalState
APPROVAL_STATE_CONSUMED: ApprovalState
APPROVAL_STATE_EXPIRED: ApprovalState

class Approval(_message.Message):
    __slots__ = ("approval_id", "agent_id", "task_id", "task_intent", "task_context", "kind", "audience", "scopes", "bind_to_client_cert", "key_sha256", "ttl_seconds", "state", "policy_id", "created_at", "expires_at", "decided_by", "decided_at", "reason", "dpop_jkt", "tool", "arguments_sha256")
    class TaskContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_INTENT_FIELD_NUMBER: _ClassVar[int]
    TASK_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    BIND_TO_CLIENT_CERT_FIELD_NUMBER: _ClassVar[int]
    KEY_SHA256_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DECIDED_BY_FIELD_NUMBER: _ClassVar[int]
    DECIDED_AT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    DPOP_JKT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    agent_id: str
    task_id: str
    task_intent: str
    task_context: _containers.ScalarMap[str, str]
    kind: LeaseKind
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    bind_to_client_cert: bool
    key_sha256: str
    ttl_seconds: int
    state: ApprovalState
    policy_id: str
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    decided_by: str
    decided_at: _timestamp_pb2.Timestamp
    reason: str
    dpop_jkt: str
    tool: str
    arguments_sha256: str
    def __init__(self, approval_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., task_intent: _Optional[str] = ..., task_context: _Optional[_Mapping[str, str]] = ..., kind: _Optional[_Union[LeaseKind, str]] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., bind_to_client_cert: _Optional[bool] = ..., key_sha256: _Optional[str] = ..., ttl_seconds: _Optional[int] = ..., state: _Optional[_Union[ApprovalState, str]] = ..., policy_id: _Optional[str] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., decided_by: _Optional[str] = ..., decided_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., reason: _Optional[str] = ..., dpop_jkt: _Optional[str] = ..., tool: _Optional[str] = ..., arguments_sha256: _Optional[str] = ...) -> None: ...

class Envelope(_message.Message):
    __slots__ = ("audiences", "scopes")
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, audiences: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ...) -> None: ...

class Task(_message.Message):
    __slots__ = ("task_id", "agent_id", "intent", "context", "envelope", "state", "created_at", "expires_at", "revocation_reason", "ended_at", "parent_task_id", "delegated_by")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    ENVELOPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_REASON_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DELEGATED_BY_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_id: str
    intent: str
    context: _containers.ScalarMap[str, str]
    envelope: Envelope
    state: TaskState
    created_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    revocation_reason: RevocationReason
    ended_at: _timestamp_pb2.Timestamp
    parent_task_id: str
    delegated_by: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., intent: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., envelope: _Optional[_Union[Envelope, _Mapping]] = ..., state: _Optional[_Union[TaskState, str]] = ..., created_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revocation_reason: _Optional[_Union[RevocationReason, str]] = ..., ended_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., parent_task_id: _Optional[str] = ..., delegated_by: _Optional[_Iterable[str]] = ...) -> None: ...

class Lease(_message.Message):
    __slots__ = ("lease_id", "kind", "agent_id", "task_id", "audience", "scopes", "issued_at", "expires_at", "state", "revocation_reason", "revoked_at", "revoked_by", "cert_thumbprint", "serial")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    ISSUED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    REVOKED_BY_FIELD_NUMBER: _ClassVar[int]
    CERT_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    kind: LeaseKind
    agent_id: str
    task_id: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    issued_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    state: LeaseState
    revocation_reason: RevocationReason
    revoked_at: _timestamp_pb2.Timestamp
    revoked_by: str
    cert_thumbprint: str
    serial: str
    def __init__(self, lease_id: _Optional[str] = ..., kind: _Optional[_Union[LeaseKind, str]] = ..., agent_id: _Optional[str] = ..., task_id: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., issued_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., state: _Optional[_Union[LeaseState, str]] = ..., revocation_reason: _Optional[_Union[RevocationReason, str]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revoked_by: _Optional[str] = ..., cert_thumbprint: _Optional[str] = ..., serial: _Optional[str] = ...) -> None: ...
