"""The Broker service as the agent clients call it: its unary methods,
read from the generated descriptors, the requests built from a caller's
arguments (checked first), and the answers decoded. No I/O happens here."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message

from mayfly.types import Certificate
from mayfly.v1 import broker_pb2, types_pb2

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp", bound=Message)


@dataclass(frozen=True)
class Rpc(Generic[Req, Resp]):
    """One unary method of the Broker service."""

    path: str
    request: type[Req]
    response: type[Resp]


def _rpc(name: str, req: type[Req], resp: type[Resp]) -> Rpc[Req, Resp]:
    svc = broker_pb2.DESCRIPTOR.services_by_name["Broker"]
    method = svc.methods_by_name[name]
    # The generated descriptors are the contract: a renamed or retyped
    # method fails at import, not at the first call.
    if method.input_type.full_name != req.DESCRIPTOR.full_name:
        raise ImportError(f"{name} takes {method.input_type.full_name}")
    if method.output_type.full_name != resp.DESCRIPTOR.full_name:
        raise ImportError(f"{name} returns {method.output_type.full_name}")
    return Rpc(f"/{svc.full_name}/{method.name}", req, resp)


START_TASK = _rpc("StartTask", broker_pb2.StartTaskRequest, types_pb2.Task)
GET_TASK = _rpc("GetTask", broker_pb2.GetTaskRequest, types_pb2.Task)
ISSUE_TOKEN = _rpc("IssueToken", broker_pb2.IssueTokenRequest, broker_pb2.IssuedToken)
COMPLETE_TASK = _rpc(
    "CompleteTask", broker_pb2.CompleteTaskRequest, broker_pb2.CompleteTaskResponse
)
SIGN_CERTIFICATE = _rpc(
    "SignCertificate", broker_pb2.SignCertificateRequest, broker_pb2.IssuedCertificate
)
UPDATE_CONTEXT = _rpc(
    "UpdateTaskContext",
    broker_pb2.UpdateTaskContextRequest,
    broker_pb2.UpdateTaskContextResponse,
)
ISSUE_DATABASE_CREDENTIAL = _rpc(
    "IssueDatabaseCredential",
    broker_pb2.IssueDatabaseCredentialRequest,
    broker_pb2.DatabaseCredential,
)
WAIT_APPROVAL = _rpc("WaitApproval", broker_pb2.WaitApprovalRequest, types_pb2.Approval)
DELEGATE_TASK = _rpc("DelegateTask", broker_pb2.DelegateTaskRequest, types_pb2.Task)


def ttl_seconds(ttl: float | dt.timedelta | None) -> int:
    """A TTL as the broker takes it: whole seconds, 0 for its default."""
    if ttl is None:
        return 0
    secs = ttl.total_seconds() if isinstance(ttl, dt.timedelta) else float(ttl)
    if secs <= 0:
        raise ValueError("ttl must be positive (or None for the broker's default)")
    return max(1, round(secs))


def start_request(
    intent: str,
    audiences: Sequence[str],
    scopes: Sequence[str],
    context: Mapping[str, str] | None,
    ttl: float | dt.timedelta | None,
) -> broker_pb2.StartTaskRequest:
    if isinstance(audiences, str) or isinstance(scopes, str):
        raise TypeError("audiences and scopes are lists of strings, not a string")
    return broker_pb2.StartTaskRequest(
        intent=intent,
        audiences=list(audiences),
        scopes=list(scopes),
        context=dict(context or {}),
        ttl_seconds=ttl_seconds(ttl),
    )


def token_request(
    task_id: str,
    audience: str,
    scopes: Sequence[str],
    *,
    bind: bool,
    dpop_jwk: str | None,
    ttl: float | dt.timedelta | None,
    approval_id: str | None,
) -> broker_pb2.IssueTokenRequest:
    if isinstance(scopes, str):
        raise TypeError("scopes is a list of strings, not a string")
    return broker_pb2.IssueTokenRequest(
        task_id=task_id,
        audience=audience,
        scopes=list(scopes),
        ttl_seconds=ttl_seconds(ttl),
        bind_to_client_cert=bind,
        dpop_jwk=dpop_jwk or "",
        approval_id=approval_id or "",
    )


def database_login_request(
    task_id: str,
    database: str,
    scopes: Sequence[str],
    ttl: float | dt.timedelta | None,
    approval_id: str | None,
) -> broker_pb2.IssueDatabaseCredentialRequest:
    if isinstance(scopes, str):
        raise TypeError("scopes is a list of strings, not a string")
    return broker_pb2.IssueDatabaseCredentialRequest(
        task_id=task_id,
        database=database,
        scopes=list(scopes),
        ttl_seconds=ttl_seconds(ttl),
        approval_id=approval_id or "",
    )


def certificate_request(
    task_id: str, csr: bytes, ttl: float | dt.timedelta | None, approval_id: str | None
) -> broker_pb2.SignCertificateRequest:
    return broker_pb2.SignCertificateRequest(
        task_id=task_id, csr=csr, ttl_seconds=ttl_seconds(ttl), approval_id=approval_id or ""
    )


def context_request(
    task_id: str, set_: Mapping[str, str] | None, remove: Iterable[str] | None
) -> broker_pb2.UpdateTaskContextRequest:
    if isinstance(remove, str):
        raise TypeError("remove is a list of keys, not a string")
    return broker_pb2.UpdateTaskContextRequest(
        task_id=task_id, set=dict(set_ or {}), remove=list(remove or ())
    )


def delegate_request(
    task_id: str,
    to: str,
    intent: str,
    audiences: Sequence[str],
    scopes: Sequence[str],
    ttl: float | dt.timedelta | None,
) -> broker_pb2.DelegateTaskRequest:
    return broker_pb2.DelegateTaskRequest(
        parent_task_id=task_id,
        delegate_id=to,
        intent=intent,
        audiences=list(audiences),
        scopes=list(scopes),
        ttl_seconds=ttl_seconds(ttl),
    )


def new_csr() -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """A fresh P-256 key and a PKCS#10 request for it (DER). The broker uses
    only the public key: subject and SANs come from the task."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return key, csr.public_bytes(serialization.Encoding.DER)


def certificate(
    issued: broker_pb2.IssuedCertificate, key: ec.EllipticCurvePrivateKey
) -> Certificate:
    return Certificate(
        certificate_pem=issued.certificate_pem,
        chain_pem=issued.chain_pem,
        private_key=key,
        lease_id=issued.lease_id,
        serial=issued.serial,
        spiffe_id=issued.spiffe_id,
        expires_at=issued.expires_at.ToDatetime(tzinfo=dt.timezone.utc),
    )
