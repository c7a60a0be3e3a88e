from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ServedRequest(_message.Message):
    __slots__ = ("lease_id", "method", "route", "accepted", "refused_because", "status", "latency_us")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    ROUTE_FIELD_NUMBER: _ClassVar[int]
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    REFUSED_BECAUSE_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    LATENCY_US_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    method: str
    route: str
    accepted: bool
    refused_because: str
    status: int
    latency_us: int
    def __init__(self, lease_id: _Optional[str] = ..., method: _Optional[str] = ..., route: _Optional[str] = ..., accepted: _Optional[bool] = ..., refused_because: _Optional[str] = ..., status: _Optional[int] = ..., latency_us: _Optional[int] = ...) -> None: ...

class ReportRequestsRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ServedRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ServedRequest, _Mapping]]] = ...) -> None: ...

class ReportRequestsResponse(_message.Message):
    __slots__ = ("recorded",)
    RECORDED_FIELD_NUMBER: _ClassVar[int]
    recorded: int
    def __init__(self, recorded: _Optional[int] = ...) -> None: ...
