"""What the sync and async clients share: the RPC table (paths taken from
the generated descriptors), request building, the token cache's rules, CSR
making, the agent's TLS context and its gRPC credentials. No I/O happens
here."""

from __future__ import annotations

import datetime as dt
import os
import ssl
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from google.protobuf.message import Message

from mayfly.config import Connection
from mayfly.errors import ApprovalDenied, MayflyError
from mayfly.types import Approval, Certificate
from mayfly.v1 import broker_pb2, types_pb2
from mayfly.workload_token import WorkloadToken

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
WAIT_APPROVAL = _rpc("WaitApproval", broker_pb2.WaitApprovalRequest, types_pb2.Approval)
DELEGATE_TASK = _rpc("DelegateTask", broker_pb2.DelegateTaskRequest, types_pb2.Task)

# The longest single WaitApproval the broker allows.
MAX_APPROVAL_WAIT = 60


def approval_wait(left: float) -> int:
    """How long the next WaitApproval asks to wait, `left` seconds before
    the caller gives up."""
    return max(0, min(MAX_APPROVAL_WAIT, int(left)))


def approved(approval: Approval) -> bool:
    """Whether an operator approved `approval` (False while pending);
    raises `ApprovalDenied` if it was refused or expired."""
    if approval.state == "approved":
        return True
    if approval.state == "pending":
        return False
    raise ApprovalDenied(
        "PERMISSION_DENIED",
        f"approval_{approval.state}",
        f"approval {approval.approval_id} is {approval.state}"
        + (f" by {approval.decided_by}" if approval.decided_by else "")
        + (f": {approval.reason}" if approval.reason else ""),
        approval.approval_id,
        approval.reason,
    )


def ttl_seconds(ttl: float | dt.timedelta | None) -> int:
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
        approval_id=approval_id or "",
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


# Audience, scopes, and the binding: the client certificate (True), a DPoP
# key's thumbprint, or none (False).
CacheKey = tuple[str, frozenset[str], bool | str]


def cache_key(audience: str, scopes: Sequence[str], binding: bool | str) -> CacheKey:
    return (audience, frozenset(scopes), binding)


def still_fresh(expires_at: dt.datetime, issued_at: float, now: float | None = None) -> bool:
    """Whether a cached token is kept: renewed once less than a fifth of its
    life (at most 30 s) is left, so a request never leaves with a token
    about to expire."""
    now = time.time() if now is None else now
    life = expires_at.timestamp() - issued_at
    margin = min(30.0, max(1.0, life / 5))
    return expires_at.timestamp() - now > margin


def audience_for(url: str, audiences: Iterable[str]) -> str | None:
    """The task audience a request to `url` is for: the longest audience
    that is the URL's origin plus a path prefix of it. None when no audience
    covers the URL, so a token is never sent where it does not belong."""
    u = urlsplit(url)
    best: str | None = None
    for aud in audiences:
        a = urlsplit(aud)
        if (a.scheme, a.hostname, a.port) != (u.scheme, u.hostname, u.port) or not a.scheme:
            continue
        path = a.path.rstrip("/")
        if path and u.path != path and not u.path.startswith(path + "/"):
            continue
        if best is None or len(aud) > len(best):
            best = aud
    return best


class _BearerToken(grpc.AuthMetadataPlugin):
    """Puts the agent's workload token on every call."""

    def __init__(self, source: WorkloadToken) -> None:
        self._source = source

    def __call__(
        self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback
    ) -> None:
        try:
            metadata = self._source.header()
        except Exception as e:  # grpc fails the call with it
            callback((), e)
            return
        callback(metadata, None)


def channel_credentials(conn: Connection) -> grpc.ChannelCredentials:
    """TLS to the broker presenting the agent's SVID, or, for an agent
    without one, server-authenticated TLS with its workload token on every
    call."""
    if conn.workload_token is None:
        return grpc.ssl_channel_credentials(
            root_certificates=conn.ca_pem,
            private_key=conn.key_pem,
            certificate_chain=conn.cert_pem,
        )
    return grpc.composite_channel_credentials(
        grpc.ssl_channel_credentials(root_certificates=conn.ca_pem),
        grpc.metadata_call_credentials(_BearerToken(conn.workload_token), name="workload-token"),
    )


def binds_certificate(conn: Connection, bind: bool | None) -> bool:
    """`bind`, or by default: bound to the certificate if the agent has one."""
    return conn.has_certificate if bind is None else bind


def ssl_context(conn: Connection, cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
    """A client TLS context that presents the agent's SVID (so a
    certificate-bound token is accepted), if it has one, and trusts
    `cafile`, or the broker's CA bundle."""
    ctx = ssl.create_default_context(
        cafile=os.fspath(cafile) if cafile else None,
        cadata=None if cafile else conn.ca_pem.decode("ascii"),
    )
    if not conn.has_certificate:
        return ctx
    # ssl loads a chain only from files: a private directory, gone at once.
    with tempfile.TemporaryDirectory(prefix="mayfly-") as d:
        cert, key = os.path.join(d, "svid.pem"), os.path.join(d, "svid.key")
        for path, data in ((cert, conn.cert_pem), (key, conn.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(cert, key)
        except ssl.SSLError as e:
            raise MayflyError(f"the agent's certificate and key do not load: {e}") from e
    return ctx
