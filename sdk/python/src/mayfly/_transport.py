"""How the agent clients reach the broker and the services it issues for:
the gRPC channel credentials (the agent's SVID, or its workload token on
every call), a Broker method on a channel, and a TLS context presenting
the SVID."""

from __future__ import annotations

import os
import ssl
import tempfile
from typing import Any, overload

import grpc
import grpc.aio

from mayfly._wire import Req, Resp, Rpc
from mayfly.config import Connection
from mayfly.errors import MayflyError
from mayfly.workload_token import WorkloadToken


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


# How long one call may take: longer than the longest approval wait.
CALL_TIMEOUT = 90.0


@overload
def unary(
    channel: grpc.aio.Channel, rpc: Rpc[Req, Resp]
) -> grpc.aio.UnaryUnaryMultiCallable[Req, Resp]: ...
@overload
def unary(
    channel: grpc.Channel, rpc: Rpc[Req, Resp]
) -> grpc.UnaryUnaryMultiCallable[Req, Resp]: ...
def unary(channel: grpc.Channel | grpc.aio.Channel, rpc: Rpc[Req, Resp]) -> Any:
    """`rpc` on `channel`, blocking or asyncio as the channel is."""
    return channel.unary_unary(
        rpc.path,
        request_serializer=rpc.request.SerializeToString,
        response_deserializer=rpc.response.FromString,
    )


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
