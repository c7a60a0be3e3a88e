"""The blocking agent client: `with mayfly.connect() as broker`.

A `Task` is a context manager: entering starts it, leaving completes it
(revoking everything issued under it), also when the block raises. What
each method does is decided in `mayfly._core`; this module makes the
calls, renews the workload token and takes the locks that asks for, on
the calling thread."""

from __future__ import annotations

import contextlib
import functools
import os
import ssl
import threading
from typing import Any

import grpc
from google.protobuf.message import Message

from mayfly import _core as core
from mayfly import _flow as flows
from mayfly._flow import Flow, T
from mayfly._transport import CALL_TIMEOUT, channel_credentials, ssl_context, unary
from mayfly._wire import Resp, Rpc
from mayfly.auth import TaskAuth
from mayfly.config import Connection
from mayfly.errors import from_rpc_error


class Task(core.TaskMethods, flows.Blocking[core.TaskCore]):
    """One task of the agent, and the credentials issued under it: open it
    with `with` (started on entry, completed on exit)."""

    def __init__(self, broker: Broker, task: core.TaskCore) -> None:
        super().__init__(task)
        self._broker = broker

    def _run(self, flow: Flow[T]) -> T:
        return self._broker._run(flow)

    def __enter__(self) -> Task:
        self._run(self._core.enter())
        return self

    def __exit__(self, _type: object, exc: BaseException | None, _tb: object) -> None:
        self._run(self._core.leave(exc))

    auth = flows.constructs(TaskAuth, "auth")


class Broker(core.BrokerMethods[Task], flows.Blocking[core.BrokerCore[Task]]):
    """A connection to the broker as one agent (its SVID). Make it with
    `mayfly.connect()`; close it with `with` or `close()`."""

    def __init__(self, conn: Connection) -> None:
        wrap = functools.partial(Task, self)
        super().__init__(core.BrokerCore(conn, wrap=wrap, new_lock=threading.Lock))
        self._channel = grpc.secure_channel(conn.target, channel_credentials(conn))

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Broker:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def call(self, rpc: Rpc[Any, Resp], request: Message) -> Resp:
        """One Broker RPC (`rpc` from `mayfly._wire`); a refusal raises its
        typed `BrokerError`."""
        return self._run(self._core.call(rpc, request))

    def ssl_context(self, cafile: str | os.PathLike[str] | None = None) -> ssl.SSLContext:
        """A TLS context presenting this agent's SVID, for calling a service
        with a certificate-bound token (e.g. `httpx.Client(verify=…)`)."""
        return ssl_context(self.connection, cafile)

    def _run(self, flow: Flow[T]) -> T:
        """Runs `flow` to its end, doing what it asks."""
        run = flows.Run(flow)
        with contextlib.ExitStack() as held:
            for op in run.requests():
                with run.answer() as answer:
                    answer.value = self._do(op, held)
        return run.result

    def _do(self, op: flows.Op, held: contextlib.ExitStack) -> object:
        if isinstance(op, flows.Call):
            try:
                return unary(self._channel, op.rpc)(op.request, timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                raise from_rpc_error(e) from None
        if isinstance(op, flows.Renew):
            return op.source.renew()
        return held.enter_context(op.lock)
