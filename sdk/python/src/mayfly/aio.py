"""The asyncio agent client: `async with mayfly.connect() as broker`.

A `Task` is a context manager: entering starts it, leaving completes it
(revoking everything issued under it), also when the block raises."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import ssl
import time
from collections.abc import Iterable, Mapping, Sequence
from types import TracebackType

import grpc
import grpc.aio
from google.protobuf.message import Message

from mayfly import _shared as sh
from mayfly.auth import AsyncTaskAuth
from mayfly.config import Connection
from mayfly.dpop import DpopKey
from mayfly.errors import ApprovalRequired, BrokerError, TaskEnded, from_rpc_error
from mayfly.types import Approval, Certificate, TaskInfo, Token
from mayfly.v1 import broker_pb2
from mayfly.workload_token import RENEWABLE

log = logging.getLogger("mayfly")


class AsyncBroker:
    """A connection to the broker as one agent (its SVID). Make it with
    `mayfly.connect()`; close it with `async with` or `close()`."""

    def __init__(self, conn: Connection) -> None:
        self.connection = conn
        creds = sh.channel_credentials(conn)
        self._channel = grpc.aio.secure_channel(conn.target, creds)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def call(self, rpc: sh.Rpc[sh.Req, sh.Resp], request: Message) -> sh.Resp:
        """One Broker RPC; a refusal raises its typed `BrokerError`. An agent
        with a workload token whose token was already used (on another
        connection) or has expired fetches a fresh one and tries once more."""
        try:
            return await self._invoke(rpc, request)
        except BrokerError as error:
            token = self.connection.workload_token
            if token is None or error.error not in RENEWABLE:
                raise
            # The broker refused the token before doing anything.
            await asyncio.to_thread(token.renew)
        return await self._invoke(rpc, request)

    async def _invoke(self, rpc: sh.Rpc[sh.Req, sh.Resp], request: Message) -> sh.Resp:
        method = self._channel.unary_unary(
            rpc.path,
            request_serializer=rpc.request.SerializeToString,
            response_deserializer=rpc.response.FromString,
        )
        try:
            response: sh.Resp = await method(request, timeout=90)
        except grpc.RpcError as e:
            raise from_rpc_error(e) from None
        return response

    def task(
        self,
        intent: str,
        *,
        audiences: Sequence[str],
        scopes: Sequence[str] = (),
        context: Mapping[str, str] | None = None,
        ttl: float | dt.timedelta | None = None,
    ) -> AsyncTask:
        """A task to open with `async with` (started on entry, completed on
        exit). `ttl` in seconds or a timedelta; None takes the broker's
        default."""
        return AsyncTask(self, sh.start_request(intent, audiences, scopes, context, ttl))

    async def start_task(
        self,
        intent: str,
        *,
        audiences: Sequence[str],
        scopes: Sequence[str] = (),
        context: Mapping[str, str] | None = None,
        ttl: float | dt.timedelta | None = None,
    ) -> AsyncTask:
        """Starts a task now; complete it with `await task.complete()`."""
        task = self.task(intent, audiences=audiences, scopes=scopes, context=context, ttl=ttl)
        await task.start()
        return task

    async def attach(self, task_id: str) -> AsyncTask:
        """A task this agent already owns, e.g. one delegated to it."""
        info = await self.call(sh.GET_TASK, broker_pb2.GetTaskRequest(task_id=task_id))
        return AsyncTask(self, None, TaskInfo.from_pb(info))

    async def wait_for_approval(self, approval_id: str, timeout: float = 300) -> Approval:
        """Waits until an operator decides. Returns the approved approval
        (repeat the request with its `approval_id`); raises `ApprovalDenied`
        if refused or expired, `TimeoutError` if still pending."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            got = await self.call(
                sh.WAIT_APPROVAL,
                broker_pb2.WaitApprovalRequest(
                    approval_id=approval_id, wait_seconds=sh.approval_wait(left)
                ),
            )
            approval = Approval.from_pb(got)
            if sh.approved(approval):
                return approval
            if left <= 1:
                raise TimeoutError(f"approval {approval_id} is still pending after {timeout} s")

    def ssl_context(self, cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
        """A TLS context presenting this agent's SVID, for calling a service
        with a certificate-bound token (e.g. `httpx.AsyncClient(verify=…)`)."""
        return sh.ssl_context(self.connection, cafile)


class AsyncTask:
    """One task of the agent, and the credentials issued under it."""

    def __init__(
        self,
        broker: AsyncBroker,
        request: broker_pb2.StartTaskRequest | None,
        info: TaskInfo | None = None,
    ) -> None:
        self._broker = broker
        self._request = request
        self._info = info
        self._tokens: dict[sh.CacheKey, tuple[Token, float]] = {}
        self._locks: dict[sh.CacheKey, asyncio.Lock] = {}

    @property
    def info(self) -> TaskInfo:
        if self._info is None:
            raise RuntimeError("the task has not been started: use `async with` or `start()`")
        return self._info

    @property
    def task_id(self) -> str:
        return self.info.task_id

    async def start(self) -> TaskInfo:
        if self._info is not None:
            raise RuntimeError(f"task {self._info.task_id} is already started")
        if self._request is None:
            raise RuntimeError("nothing to start")
        self._info = TaskInfo.from_pb(await self._broker.call(sh.START_TASK, self._request))
        return self._info

    async def __aenter__(self) -> AsyncTask:
        if self._info is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self.complete()
        except Exception:
            if exc is None:
                raise
            # Do not hide the block's own exception; say the task stayed open.
            log.exception("could not complete task %s; it ends at its expiry", self.task_id)

    async def complete(self) -> list[str]:
        """Ends the task; returns the lease ids revoked (the task's own and
        every credential's). Completing an ended task does nothing."""
        self._tokens.clear()
        try:
            done = await self._broker.call(
                sh.COMPLETE_TASK, broker_pb2.CompleteTaskRequest(task_id=self.task_id)
            )
        except TaskEnded:
            return []
        self._info = TaskInfo.from_pb(done.task)
        return list(done.revoked_leases)

    async def refresh(self) -> TaskInfo:
        """The task as the broker now has it."""
        got = await self._broker.call(sh.GET_TASK, broker_pb2.GetTaskRequest(task_id=self.task_id))
        self._info = TaskInfo.from_pb(got)
        return self._info

    async def token(
        self,
        audience: str,
        scopes: Sequence[str] = (),
        *,
        bind: bool | None = None,
        dpop: DpopKey | None = None,
        ttl: float | dt.timedelta | None = None,
        approval_id: str | None = None,
        wait_for_approval: float | None = None,
    ) -> Token:
        """A token for `audience` with `scopes`, from the cache while it has
        enough life left. It is bound to this agent's certificate (RFC
        8705) if the agent has one (`bind=False` asks for a bearer token),
        so it is useless to anyone without the agent's key; `dpop` binds
        it to that DPoP key instead (RFC 9449; send it with
        `dpop.proof(...)`). If policy requires approval this raises
        `ApprovalRequired`, or with `wait_for_approval=seconds` waits for
        the operator and collects the token."""
        bind = dpop is None and sh.binds_certificate(self._broker.connection, bind)
        key = sh.cache_key(audience, scopes, dpop.jkt if dpop else bind)
        lock = self._locks.setdefault(key, asyncio.Lock())
        async with lock:
            cached = self._tokens.get(key)
            if cached and approval_id is None and sh.still_fresh(cached[0].expires_at, cached[1]):
                return cached[0]
            req = sh.token_request(
                self.task_id, audience, scopes, bind=bind, ttl=ttl, approval_id=approval_id
            )
            if dpop is not None:
                req.dpop_jwk = dpop.public_jwk_json
            issued_at = time.time()
            got = await self._broker.call(sh.ISSUE_TOKEN, req)
            if got.HasField("approval"):
                approval = Approval.from_pb(got.approval)
                if wait_for_approval is None:
                    raise ApprovalRequired(approval)
                await self._broker.wait_for_approval(approval.approval_id, wait_for_approval)
                req.approval_id = approval.approval_id
                issued_at = time.time()
                got = await self._broker.call(sh.ISSUE_TOKEN, req)
            token = Token.from_pb(got)
            self._tokens[key] = (token, issued_at)
            return token

    def forget(self, lease_id: str) -> None:
        """Drops a cached token (e.g. one a service refused)."""
        self._tokens = {k: v for k, v in self._tokens.items() if v[0].lease_id != lease_id}

    async def certificate(
        self,
        *,
        ttl: float | dt.timedelta | None = None,
        approval_id: str | None = None,
    ) -> Certificate:
        """An X.509-SVID of this task. The key pair is made here; only a CSR
        is sent. Raises `ApprovalRequired` when policy asks an operator."""
        key, csr = sh.new_csr()
        got = await self._broker.call(
            sh.SIGN_CERTIFICATE,
            broker_pb2.SignCertificateRequest(
                task_id=self.task_id,
                csr=csr,
                ttl_seconds=sh.ttl_seconds(ttl),
                approval_id=approval_id or "",
            ),
        )
        if got.HasField("approval"):
            raise ApprovalRequired(Approval.from_pb(got.approval))
        return sh.certificate(got, key)

    async def update_context(
        self,
        set: Mapping[str, str] | None = None,
        remove: Iterable[str] | None = None,
    ) -> list[str]:
        """Changes the task's context; returns the leases the broker revoked
        because policy no longer allows them (their cached tokens go too)."""
        got = await self._broker.call(
            sh.UPDATE_CONTEXT, sh.context_request(self.task_id, set, remove)
        )
        self._info = TaskInfo.from_pb(got.task)
        for lease in got.revoked_leases:
            self.forget(lease)
        return list(got.revoked_leases)

    async def delegate(
        self,
        to: str,
        *,
        intent: str,
        audiences: Sequence[str],
        scopes: Sequence[str],
        ttl: float | dt.timedelta | None = None,
    ) -> TaskInfo:
        """Hands part of this task to agent `to` (a SPIFFE ID): a new task it
        owns, within this one's envelope, ending with it. The delegate picks
        it up with `broker.attach(task_id)`."""
        got = await self._broker.call(
            sh.DELEGATE_TASK,
            sh.delegate_request(self.task_id, to, intent, audiences, scopes, ttl),
        )
        return TaskInfo.from_pb(got)

    def auth(
        self,
        scopes: Sequence[str] | None = None,
        *,
        bind: bool | None = None,
        dpop: DpopKey | None = None,
    ) -> AsyncTaskAuth:
        """An `httpx.Auth` for `httpx.AsyncClient` that sends each request
        this task's token for the request's audience (see `mayfly.auth`)."""
        return AsyncTaskAuth(self, scopes, bind=bind, dpop=dpop)
