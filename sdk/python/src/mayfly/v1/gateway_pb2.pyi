from mayfly.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class CallOutcome(_message.Message):
    __slots__ = ("call_id", "lease_id", "tool", "status", "latency_us", "error")
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    call_id: str
    lease_id: str
    tool: str
    status: int
    latency_us: int
    error: str
    def __init__(self, call_id: _Optional[str] = ..., lease_id: _Optional[str] = ..., tool: _Optional[str] = ..., status: _Optional[int] = ..., latency_us: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ReportOutcomesRequest(_message.Message):
    __slots__ = ("outcomes",)
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    outcomes: _containers.RepeatedCompositeFieldContainer[CallOutcome]
    def __init__(self, outcomes: _Optional[_Iterable[_Union[CallOutcome, _Mapping]]] = ...) -> None: ...

class ReportOutcomesResponse(_message.Message):
    __slots__ = ("recorded",)
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    def __init__(self, recorded: _Optional[int] = ...) -> None: ...

class ListCallableRequest(_message.Message):
    __slots__ = ("lease_id", "upstream", "tools")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    upstream: str
    tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, lease_id: _Optional[str] = ..., upstream: _Optional[str] = ..., tools: _Optional[_Iterable[str]] = ...) -> None: ...

class ListCallableResponse(_message.Message):
    __slots__ = ("tools",)
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    tools: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, tools: _Optional[_Iterable[str]] = ...) -> None: ...

class AuthorizeCallRequest(_message.Message):
    __slots__ = ("lease_id", "tool", "arguments", "method", "route", "approval_id")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    tool: str
    arguments: str
    method: str
    route: str
    approval_id: str
    def __init__(self, lease_id: _Optional[str] = ..., tool: _Optional[str] = ..., arguments: _Optional[str] = ..., method: _Optional[str] = ..., route: _Optional[str] = ..., approval_id: _Optional[str] = ...) -> None: ...

class CallDecision(_message.Message):
    __slots__ = ("allowed", "policy_id", "arguments_sha256", "approval_id", "approval", "call_id")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    policy_id: str
    arguments_sha256: str
    approval_id: str
    approval: _types_pb2.Approval
    call_id: str
    def __init__(self, allowed: _Optional[bool] = ..., policy_id: _Optional[str] = ..., arguments_sha256: _Optional[str] = ..., approval_id: _Optional[str] = ..., approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ..., call_id: _Optional[str] = ...) -> None: ...
