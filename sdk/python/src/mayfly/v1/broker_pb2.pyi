import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from mayfly.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class IssueDatabaseCredentialRequest(_message.Message):
    __slots__ = ("task_id", "database", "scopes", "ttl_seconds", "approval_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    database: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    approval_id: str
    def __init__(self, task_id: _Optional[str] = ..., database: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., approval_id: _Optional[str] = ...) -> None: ...

class DatabaseCredential(_message.Message):
    __slots__ = ("lease_id", "user", "password", "dsn", "expires_at", "database", "approval")
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    USER_FIELD_NUMBER: _ClassVar[int]
    PASSWORD_FIELD_NUMBER: _ClassVar[int]
    DSN_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    lease_id: str
    user: str
    password: str
    dsn: str
    expires_at: _timestamp_pb2.Timestamp
    database: str
    approval: _types_pb2.Approval
    def __init__(self, lease_id: _Optional[str] = ..., user: _Optional[str] = ..., password: _Optional[str] = ..., dsn: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., database: _Optional[str] = ..., approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...

class DelegateTaskRequest(_message.Message):
    __slots__ = ("parent_task_id", "delegate_id", "intent", "audiences", "scopes", "ttl_seconds")
    PARENT_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    DELEGATE_ID_FIELD_NUMBER: _ClassVar[int]
    INTENT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    parent_task_id: str
    delegate_id: str
    intent: str
    audiences: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, parent_task_id: _Optional[str] = ..., delegate_id: _Optional[str] = ..., intent: _Optional[str] = ..., audiences: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class UpdateTaskContextRequest(_message.Message):
    __slots__ = ("task_id", "set", "remove")
    class SetEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    SET_FIELD_NUMBER: _ClassVar[int]
    REMOVE_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    set: _containers.ScalarMap[str, str]
    remove: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task_id: _Optional[str] = ..., set: _Optional[_Mapping[str, str]] = ..., remove: _Optional[_Iterable[str]] = ...) -> None: ...

class UpdateTaskContextResponse(_message.Message):
    __slots__ = ("task", "revoked_leases")
    TASK_FIELD_NUMBER: _ClassVar[int]
    REVOKED_LEASES_FIELD_NUMBER: _ClassVar[int]
    task: _types_pb2.Task
    revoked_leases: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ..., revoked_leases: _Optional[_Iterable[str]] = ...) -> None: ...

class WaitApprovalRequest(_message.Message):
    __slots__ = ("approval_id", "wait_seconds")
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    approval_id: str
    wait_seconds: int
    def __init__(self, approval_id: _Optional[str] = ..., wait_seconds: _Optional[int] = ...) -> None: ...

class StartTaskRequest(_message.Message):
    __slots__ = ("intent", "context", "audiences", "scopes", "ttl_seconds")
    class ContextEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    INTENT_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    AUDIENCES_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    intent: str
    context: _containers.ScalarMap[str, str]
    audiences: _containers.RepeatedScalarFieldContainer[str]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    def __init__(self, intent: _Optional[str] = ..., context: _Optional[_Mapping[str, str]] = ..., audiences: _Optional[_Iterable[str]] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ...) -> None: ...

class GetTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class IssueTokenRequest(_message.Message):
    __slots__ = ("task_id", "audience", "scopes", "ttl_seconds", "bind_to_client_cert", "approval_id", "dpop_jwk")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BIND_TO_CLIENT_CERT_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    DPOP_JWK_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    audience: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    ttl_seconds: int
    bind_to_client_cert: bool
    approval_id: str
    dpop_jwk: str
    def __init__(self, task_id: _Optional[str] = ..., audience: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., ttl_seconds: _Optional[int] = ..., bind_to_client_cert: _Optional[bool] = ..., approval_id: _Optional[str] = ..., dpop_jwk: _Optional[str] = ...) -> None: ...

class IssuedToken(_message.Message):
    __slots__ = ("token", "lease_id", "expires_at", "token_type", "scopes", "audience", "approval")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_TYPE_FIELD_NUMBER: _ClassVar[int]
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    AUDIENCE_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    token: str
    lease_id: str
    expires_at: _timestamp_pb2.Timestamp
    token_type: str
    scopes: _containers.RepeatedScalarFieldContainer[str]
    audience: str
    approval: _types_pb2.Approval
    def __init__(self, token: _Optional[str] = ..., lease_id: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., token_type: _Optional[str] = ..., scopes: _Optional[_Iterable[str]] = ..., audience: _Optional[str] = ..., approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...

class CompleteTaskRequest(_message.Message):
    __slots__ = ("task_id",)
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    def __init__(self, task_id: _Optional[str] = ...) -> None: ...

class CompleteTaskResponse(_message.Message):
    __slots__ = ("revoked_leases", "task")
    REVOKED_LEASES_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    revoked_leases: _containers.RepeatedScalarFieldContainer[str]
    task: _types_pb2.Task
    def __init__(self, revoked_leases: _Optional[_Iterable[str]] = ..., task: _Optional[_Union[_types_pb2.Task, _Mapping]] = ...) -> None: ...

class SignCertificateRequest(_message.Message):
    __slots__ = ("task_id", "csr", "ttl_seconds", "approval_id")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_FIELD_NUMBER: _ClassVar[int]
    TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_ID_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    csr: bytes
    ttl_seconds: int
    approval_id: str
    def __init__(self, task_id: _Optional[str] = ..., csr: _Optional[bytes] = ..., ttl_seconds: _Optional[int] = ..., approval_id: _Optional[str] = ...) -> None: ...

class IssuedCertificate(_message.Message):
    __slots__ = ("certificate_pem", "chain_pem", "lease_id", "serial", "expires_at", "spiffe_id", "approval")
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    LEASE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    SPIFFE_ID_FIELD_NUMBER: _ClassVar[int]
    APPROVAL_FIELD_NUMBER: _ClassVar[int]
    certificate_pem: str
    chain_pem: str
    lease_id: str
    serial: str
    expires_at: _timestamp_pb2.Timestamp
    spiffe_id: str
    approval: _types_pb2.Approval
    def __init__(self, certificate_pem: _Optional[str] = ..., chain_pem: _Optional[str] = ..., lease_id: _Optional[str] = ..., serial: _Optional[str] = ..., expires_at: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., spiffe_id: _Optional[str] = ..., approval: _Optional[_Union[_types_pb2.Approval, _Mapping]] = ...) -> None: ...
