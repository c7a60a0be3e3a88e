import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mayfly.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReadAuditRequest(_message.Message):
    __slots__ = ("after_cursor", "last", "follow")
    AFTER_CURSOR_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    FOLLOW_FIELD_NUMBER: _ClassVar[int]
    after_cursor: str
    last: int
    follow: bool
    def __init__(self, after_cursor: _Optional[str] = ..., last: _Optional[int] = ..., follow: _Optional[bool] = ...) -> None: ...

class AuditBatch(_message.Message):
    __slots__ = ("records", "cursor")
    RECORDS_FIELD_NUMBER: _ClassVar[int]
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    records: _containers.RepeatedScalarFieldContainer[str]
    cursor: str
    def __init__(self, records: _Optional[_Iterable[str]] = ..., cursor: _Optional[str] = ...) -> None: ...

class ListApprovalsRequest(_message.Message):
    __slots__ = ("all", "page_size", "page_token")
    ALL_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    all: bool
    page_size: int
    page_token: str
    def __init__(self, all: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListApprovalsResponse(_message.Message):
    __slots__ = ("approvals", "next_page_token")
    APPROVALS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    approvals: _containers.RepeatedCompositeFieldContainer[_types_pb2.Approval]
    next_page_token: str
    def __init__(self, approvals: _Optional[_Iterable[_Union[_types_pb2.Approval, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DecideApprovalRequest(_message.Message):
    __slots__ = ("approval_id", "reason")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    reason: str
    def __init__(self, approval_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ListLeasesRequest(_message.Message):
    __slots__ = ("task_id", "agent_id", "state", "kind", "page_size", "page_token")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    agent_id: str
    state: _types_pb2.LeaseState
    kind: _types_pb2.LeaseKind
    page_size: int
    page_token: str
    def __init__(self, task_id: _Optional[str] = ..., agent_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.LeaseState, str]] = ..., kind: _Optional[_Union[_types_pb2.LeaseKind, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLeasesResponse(_message.Message):
    __slots__ = ("leases", "next_page_token")
    LEASES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    leases: _containers.RepeatedCompositeFieldContainer[_types_pb2.Lease]
    next_page_token: str
    def __init__(self, leases: _Optional[_Iterable[_Union[_types_pb2.Lease, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetLeaseRequest(_message.Message):
    __slots__ = ("lease_id",)
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    def __init__(self, lease_id: _Optional[str] = ...) -> None: ...

class RevokeLeaseRequest(_message.Message):
    __slots__ = ("lease_id", "note")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    note: str
    def __init__(self, lease_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class RevokeTaskRequest(_message.Message):
    __slots__ = ("task_id", "note")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    note: str
    def __init__(self, task_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class RevokeAgentRequest(_message.Message):
    __slots__ = ("agent_id", "note")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    note: str
    def __init__(self, agent_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class LockAgentRequest(_message.Message):
    __slots__ = ("agent_id", "reason", "ttl_seconds")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    ttl_seconds: int
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class LockAgentResponse(_message.Message):
    __slots__ = ("lock", "revoked_leases")
    LOCK_FIELD_NUMBER: _ClassVar[int]
    REVOKED_LEASES_FIELD_NUMBER: _ClassVar[int]
    lock: AgentLock
    revoked_leases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lock: _Optional[_Union[AgentLock, _Mapping]] = ..., revoked_leases: _Optional[_Iterable[str]] = ...) -> None: ...

class UnlockAgentRequest(_message.Message):
    __slots__ = ("agent_id", "note")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    note: str
    def __init__(self, agent_id: _Optional[str] = ..., note: _Optional[str] = ...) -> None: ...

class ListAgentLocksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListAgentLocksResponse(_message.Message):
    __slots__ = ("locks",)
    LOCKS_FIELD_NUMBER: _ClassVar[int]
    locks: _containers.RepeatedCompositeFieldContainer[AgentLock]
    def __init__(self, locks: _Optional[_Iterable[_Union[AgentLock, _Mapping]]] = ...) -> None: ...

class AgentLock(_message.Message):
    __slots__ = ("agent_id", "reason", "locked_by", "locked_at", "expires_at")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LOCKED_BY_FIELD_NUMBER: _ClassVar[int]
    LOCKED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    reason: str
    locked_by: str
    locked_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    def __init__(self, agent_id: _Optional[str] = ..., reason: _Optional[str] = ..., locked_by: _Optional[str] = ..., locked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class RevokeResponse(_message.Message):
    __slots__ = ("revoked_leases",)
    REVOKED_LEASES_FIELD_NUMBER: _ClassVar[int]
    revoked_leases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, revoked_leases: _Optional[_Iterable[str]] = ...) -> None: ...

class ListTasksRequest(_message.Message):
    __slots__ = ("agent_id", "state", "page_size", "page_token", "parent_task_id")
    AGENT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    agent_id: str
    state: _types_pb2.TaskState
    page_size: int
    page_token: str
    parent_task_id: str
    def __init__(self, agent_id: _Optional[str] = ..., state: _Optional[_Union[_types_pb2.TaskState, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., parent_task_id: _Optional[str] = ...) -> None: ...

class ListTasksResponse(_message.Message):
    __slots__ = ("tasks", "next_page_token")
    TASKS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    tasks: _containers.RepeatedCompositeFieldContainer[_types_pb2.Task]
    next_page_token: str
    def __init__(self, tasks: _Optional[_Iterable[_Union[_types_pb2.Task, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...
