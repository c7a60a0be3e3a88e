"""Flows: operations written once as generators and run by a blocking or
an asyncio client, sans I/O.

A flow yields a request for what it needs done and is sent the outcome.
It asks for

- `Call(rpc, request)`: one Broker RPC. The outcome is the response, or
  the call's `BrokerError`, thrown into the flow;
- `Renew(source)`: a fresh workload token from its source;
- `Hold(lock)`: the lock (one the client's `new_lock` made), held until
  the flow ends;

and returns the operation's result. A client does these three things:
`Run` steps a flow for it. A client class is `Blocking` (`client.py`) or
`Awaiting` (`aio.py`); an `operation`, declared once for both, runs its
flow to the end on the first and is a coroutine on the second, with the
flow's signature and docstring."""

from __future__ import annotations

import contextlib
import inspect
import types
from collections.abc import Callable, Coroutine, Generator, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, cast, overload

from google.protobuf.message import Message

from mayfly._wire import Rpc
from mayfly.workload_token import WorkloadToken

T = TypeVar("T")
P = ParamSpec("P")
C = TypeVar("C")
S = TypeVar("S")
R = TypeVar("R")

# --- what a flow asks for --------------------------------------------------


@dataclass(frozen=True)
class Call:
    """One Broker RPC."""

    rpc: Rpc[Any, Any]
    request: Message


@dataclass(frozen=True)
class Renew:
    """A fresh token from the agent's workload token source."""

    source: WorkloadToken


@dataclass(frozen=True)
class Hold:
    """A lock of the client's kind, to hold until the flow ends."""

    lock: Any


Op = Call | Renew | Hold
Flow = Generator[Op, Any, T]


class Answer:
    """The outcome of one request, set inside `Run.answer()`."""

    value: object = None


class Run(Generic[T]):
    """A flow being run. A client iterates over `requests()`, does each
    inside `with run.answer() as answer:` and sets `answer.value`; an
    exception leaving that block is thrown into the flow, which may handle
    it. Once the flow is done, `result` is what it returned."""

    def __init__(self, flow: Flow[T]) -> None:
        self._flow = flow
        self._pending: Op | None = None
        self._done = False
        self._result: T | None = None
        self._advance(flow.send, None)

    def _advance(self, step: Callable[[Any], Op], arg: object) -> None:
        try:
            self._pending = step(arg)
        except StopIteration as stop:
            self._pending, self._done, self._result = None, True, stop.value

    def requests(self) -> Iterator[Op]:
        """The flow's requests, each once it has the answer to the last."""
        while self._pending is not None:
            yield self._pending

    @contextlib.contextmanager
    def answer(self) -> Iterator[Answer]:
        answer = Answer()
        try:
            yield answer
        except Exception as error:
            self._advance(self._flow.throw, error)
        else:
            self._advance(self._flow.send, answer.value)

    @property
    def result(self) -> T:
        if not self._done:
            raise RuntimeError("the flow has not finished")
        return cast(T, self._result)


# --- the clients' methods ---------------------------------------------------


class Blocking(Generic[C]):
    """A client object of `client.py`: `_run` runs a flow to its end."""

    _core: C

    def _run(self, flow: Flow[T]) -> T:
        raise NotImplementedError


class Awaiting(Generic[C]):
    """A client object of `aio.py`: `_run` is a coroutine that runs a flow
    to its end."""

    _core: C

    async def _run(self, flow: Flow[T]) -> T:
        raise NotImplementedError


M = TypeVar("M", bound=Callable[..., Any])


def adopt(
    method: M, source: Callable[..., Any], name: str | None = None, doc: str | None = None
) -> M:
    """`method` under `source`'s signature (for a flow, with the result it
    returns; for a class, returning an instance), and its name and
    docstring unless `name` or `doc` is given."""
    signature = inspect.signature(source)
    returns = signature.return_annotation
    if isinstance(source, type):
        signature = signature.replace(return_annotation=source.__name__)
    elif isinstance(returns, str) and returns.startswith("Flow[") and returns.endswith("]"):
        signature = signature.replace(return_annotation=returns[len("Flow[") : -1])
    method.__name__ = name or source.__name__
    method.__qualname__ = method.__name__
    method.__doc__ = doc or source.__doc__
    setattr(method, "__signature__", signature)  # noqa: B010 - no typed way to set it
    return method


class operation(Generic[C, P, T]):
    """A client method that runs the core's `flow`: on a `Blocking` object
    it returns the flow's result, on an `Awaiting` one it is a coroutine."""

    def __init__(self, flow: Callable[Concatenate[C, P], Flow[T]]) -> None:
        def blocking(client: Blocking[C], /, *args: P.args, **kwargs: P.kwargs) -> T:
            return client._run(flow(client._core, *args, **kwargs))

        async def awaiting(client: Awaiting[C], /, *args: P.args, **kwargs: P.kwargs) -> T:
            return await client._run(flow(client._core, *args, **kwargs))

        self._blocking = adopt(blocking, flow)
        self._awaiting = adopt(awaiting, flow)

    @overload
    def __get__(self, client: None, owner: type[Any]) -> Callable[..., Any]: ...
    @overload
    def __get__(self, client: Blocking[C], owner: type[Any]) -> Callable[P, T]: ...
    @overload
    def __get__(
        self, client: Awaiting[C], owner: type[Any]
    ) -> Callable[P, Coroutine[Any, Any, T]]: ...
    def __get__(self, client: object, owner: type[Any]) -> Callable[..., Any]:
        awaits = issubclass(owner, Awaiting)
        method = self._awaiting if awaits else self._blocking
        return method if client is None else types.MethodType(method, client)


def pure(make: Callable[Concatenate[C, P], T]) -> Callable[Concatenate[Any, P], T]:
    """A client method that is its core's method `make`, which does no I/O."""

    def method(client: Blocking[C] | Awaiting[C], /, *args: P.args, **kwargs: P.kwargs) -> T:
        return make(client._core, *args, **kwargs)

    return adopt(method, make)


def constructs(make: Callable[Concatenate[S, P], R], name: str) -> Callable[Concatenate[S, P], R]:
    """A method `name` that is `make(self, ...)`: `task.auth(...)` makes
    `TaskAuth(task, ...)`."""

    def method(self: S, /, *args: P.args, **kwargs: P.kwargs) -> R:
        return make(self, *args, **kwargs)

    return adopt(method, make, name)
