from mayfly.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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
    __slots__ = ("allowed", "policy_id", "arguments_sha256", "approval_id", "approval")
    ALLOWED_FIELD_NUMBER: _ClassVar[int]
    POLICY_ID_FIELD_NUMBER: _ClassVar[int]
    ARGUMENTS_SHA256_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    allowed: bool
    policy_id: str
    arguments_sha256: str
    approval_id: str
    approval: _types_pb2.Approval
    def __init__(self, allowed: _Optional[bool] = ..., policy_id: _Optional[str] = ..., arguments_sha256: _Optional[str] = ..., approval_id: _Optional[str] = ..., approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...
