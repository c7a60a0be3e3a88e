import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mayfly.v1 import types_pb2 as _types_pb2
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WatchRequest(_message.Message):
    __slots__ = ("from_cursor",)
    FROM_CURSOR_FIELD_NUMBER: _ClassVar[int]
    from_cursor: int
    def __init__(self, from_cursor: _Optional[int] = ...) -> None: ...

class RevocationEvent(_message.Message):
    __slots__ = ("cursor", "heartbeat", "lease_id", "kind", "serial", "task_id", "reason", "revoked_at", "expires_at", "sent_at")
    CURSOR_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REVOKED_AT_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SENT_AT_FIELD_NUMBER: _ClassVar[int]
    cursor: int
    heartbeat: bool
    lease_id: str
    kind: _types_pb2.LeaseKind
    serial: str
    task_id: str
    reason: _types_pb2.RevocationReason
    revoked_at: _timestamp_pb2.Timestamp
    expires_at: _timestamp_pb2.Timestamp
    sent_at: _timestamp_pb2.Timestamp
    def __init__(self, cursor: _Optional[int] = ..., heartbeat: _Optional[bool] = ..., lease_id: _Optional[str] = ..., kind: _Optional[_Union[_types_pb2.LeaseKind, str]] = ..., serial: _Optional[str] = ..., task_id: _Optional[str] = ..., reason: _Optional[_Union[_types_pb2.RevocationReason, str]] = ..., revoked_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., sent_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...
