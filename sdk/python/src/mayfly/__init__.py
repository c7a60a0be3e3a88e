"""Mayfly for Python: task-scoped credentials for agents, and their
verification for the services agents call.

Agents::

    async with mayfly.connect() as broker:     # ./.mayfly-dev, MAYFLY_*, or arguments
        async with broker.task("summarise ticket 42",
                               audiences=["https://api.example.com"],
                               scopes=["read:tickets"]) as task:
            token = await task.token("https://api.example.com", ["read:tickets"])
    # leaving the block completes the task and revokes its credentials

`with mayfly.connect() as broker:` gives the same API, blocking.

Agents without a client certificate prove themselves with a workload token
the broker trusts (Kubernetes, JWT-SVID, OIDC)::

    mayfly.connect("https://broker:8710", ca="ca.pem",
                   token_file="/var/run/secrets/tokens/mayfly")

Services: `mayfly.Verifier` checks tokens (and follows the revocation
feed); `mayfly.asgi.TokenMiddleware` puts it in front of a Starlette or
FastAPI app.
"""

from __future__ import annotations

import os
from types import TracebackType

from mayfly.aio import AsyncBroker, AsyncTask
from mayfly.auth import AsyncTaskAuth, NoAudience, TaskAuth
from mayfly.client import Broker, Task
from mayfly.config import Connection, resolve
from mayfly.dpop import DpopKey, DpopRequest
from mayfly.errors import (
    AgentLocked,
    ApprovalDenied,
    ApprovalRequired,
    BrokerError,
    ConfigError,
    InvalidRequest,
    MayflyError,
    NotFound,
    OutsideEnvelope,
    PolicyDenied,
    RateLimited,
    TaskEnded,
    Unauthenticated,
    Unavailable,
    VerifyError,
)
from mayfly.types import (
    Approval,
    ApprovalState,
    Certificate,
    DatabaseLogin,
    TaskInfo,
    TaskState,
    Token,
)
from mayfly.verify import FeedConfig, StatusListConfig, VerifiedToken, Verifier
from mayfly.workload_token import WorkloadToken

__all__ = [
    "AgentLocked",
    "Approval",
    "ApprovalDenied",
    "ApprovalRequired",
    "ApprovalState",
    "AsyncBroker",
    "AsyncTask",
    "AsyncTaskAuth",
    "Broker",
    "BrokerError",
    "Certificate",
    "ConfigError",
    "Connection",
    "Connector",
    "DatabaseLogin",
    "DpopKey",
    "DpopRequest",
    "FeedConfig",
    "InvalidRequest",
    "MayflyError",
    "NoAudience",
    "NotFound",
    "OutsideEnvelope",
    "PolicyDenied",
    "RateLimited",
    "StatusListConfig",
    "Task",
    "TaskAuth",
    "TaskEnded",
    "TaskInfo",
    "TaskState",
    "Token",
    "Unauthenticated",
    "Unavailable",
    "VerifiedToken",
    "Verifier",
    "VerifyError",
    "WorkloadToken",
    "connect",
]


class Connector:
    """What `connect()` returns: enter it with `async with` for an
    `AsyncBroker`, or with `with` for a blocking `Broker`."""

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self._sync: Broker | None = None
        self._async: AsyncBroker | None = None

    def __enter__(self) -> Broker:
        self._sync = Broker(self.connection)
        return self._sync

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sync is not None:
            self._sync.close()
            self._sync = None

    async def __aenter__(self) -> AsyncBroker:
        self._async = AsyncBroker(self.connection)
        return self._async

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._async is not None:
            await self._async.close()
            self._async = None


def connect(
    broker: str | None = None,
    *,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    profile: str | os.PathLike[str] | None = None,
    identity: str | None = None,
    token: WorkloadToken | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> Connector:
    """The broker connection the arguments, `MAYFLY_*` variables or a dev
    profile give (see `mayfly.config`). Files are read now, so a wrong
    path fails here with `ConfigError`. An agent without a certificate
    passes its workload token's source as `token` (or `token_file`, or sets
    `MAYFLY_TOKEN_FILE`); its tokens are then bearer tokens unless it asks
    for DPoP."""
    return Connector(
        resolve(
            broker,
            ca=ca,
            cert=cert,
            key=key,
            profile=profile,
            identity=identity,
            token=token,
            token_file=token_file,
        )
    )
