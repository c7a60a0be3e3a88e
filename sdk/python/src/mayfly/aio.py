"""The asyncio agent client: `async with mayfly.connect() as broker`.

An `AsyncTask` is an async context manager: entering starts it, leaving
completes it (revoking everything issued under it), also when the block
raises. What each method does is decided in `mayfly._core`; this module
makes the calls, renews the workload token (in a worker thread) and takes
the locks that asks for, on the event loop."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import ssl
from typing import Any

import grpc
import grpc.aio
from google.protobuf.message import Message

from mayfly import _core as core
from mayfly import _flow as flows
from mayfly._flow import Flow, T
from mayfly._transport import CALL_TIMEOUT, channel_credentials, ssl_context, unary
from mayfly._wire import Resp, Rpc
from mayfly.auth import AsyncTaskAuth
from mayfly.config import Connection
from mayfly.errors import from_rpc_error


class AsyncTask(core.TaskMethods, flows.Awaiting[core.TaskCore]):
    """One task of the agent, and the credentials issued under it: open it
    with `async with` (started on entry, completed on exit); await its
    methods."""

    def __init__(self, broker: AsyncBroker, task: core.TaskCore) -> None:
        super().__init__(task)
        self._broker = broker

    async def _run(self, flow: Flow[T]) -> T:
        return await self._broker._run(flow)

    async def __aenter__(self) -> AsyncTask:
        await self._run(self._core.enter())
        return self

    async def __aexit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        await self._run(self._core.leave(exc))

    auth = flows.constructs(AsyncTaskAuth, "auth")


class AsyncBroker(core.BrokerMethods[AsyncTask], flows.Awaiting[core.BrokerCore[AsyncTask]]):
    """A connection to the broker as one agent (its SVID). Make it with
    `mayfly.connect()`; close it with `async with` or `close()`."""

    def __init__(self, conn: Connection) -> None:
        wrap = functools.partial(AsyncTask, self)
        super().__init__(core.BrokerCore(conn, wrap=wrap, new_lock=asyncio.Lock))
        self._channel = grpc.aio.secure_channel(conn.target, channel_credentials(conn))

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncBroker:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def call(self, rpc: Rpc[Any, Resp], request: Message) -> Resp:
        """One Broker RPC (`rpc` from `mayfly._wire`), awaited; a refusal
        raises its typed `BrokerError`."""
        return await self._run(self._core.call(rpc, request))

    def ssl_context(self, cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
        """A TLS context presenting this agent's SVID, for calling a service
        with a certificate-bound token (e.g. `httpx.AsyncClient(verify=…)`)."""
        return ssl_context(self.connection, cafile)

    async def _run(self, flow: Flow[T]) -> T:
        """Runs `flow` to its end, doing what it asks, awaited."""
        run = flows.Run(flow)
        async with contextlib.AsyncExitStack() as held:
            for op in run.requests():
                with run.answer() as answer:
                    answer.value = await self._do(op, held)
        return run.result

    async def _do(self, op: flows.Op, held: contextlib.AsyncExitStack) -> object:
        if isinstance(op, flows.Call):
            try:
                return await unary(self._channel, op.rpc)(op.request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
        if isinstance(op, flows.Renew):
            return await asyncio.to_thread(op.source.renew)
        return await held.enter_async_context(op.lock)
