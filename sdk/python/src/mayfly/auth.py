"""`httpx.Auth` for a task: each request gets the task's token for the
audience its URL falls under (the longest envelope audience that is the
URL's origin and a path prefix), from the task's cache. A URL no audience
covers gets no token and raises, so a token never goes where it does not
belong. With a `DpopKey`, tokens are DPoP-bound and each request carries
a fresh proof. A 401 answer with `error="invalid_token"` (e.g. the token was
revoked) drops the token and retries once with a fresh one."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import Generic, Protocol, TypeVar

import httpx

from mayfly._core import audience_for
from mayfly.dpop import DpopKey
from mayfly.errors import MayflyError
from mayfly.types import TaskInfo, Token


class NoAudience(MayflyError):
    """The request's URL is under none of the task's audiences."""


class _Task(Protocol):
    """A blocking task (`mayfly.Task`), as far as its auth uses it."""

    @property
    def info(self) -> TaskInfo: ...
    def token(
        self, aud: str, scopes: Sequence[str], /, *, bind: bool | None, dpop: DpopKey | None
    ) -> Token: ...
    def forget(self, lease_id: str) -> None: ...


class _AsyncTask(Protocol):
    """An asyncio task (`mayfly.AsyncTask`), as far as its auth uses it."""

    @property
    def info(self) -> TaskInfo: ...
    async def token(
        self, aud: str, scopes: Sequence[str], /, *, bind: bool | None, dpop: DpopKey | None
    ) -> Token: ...
    def forget(self, lease_id: str) -> None: ...


TaskT = TypeVar("TaskT", _Task, _AsyncTask)


class _TaskAuth(httpx.Auth, Generic[TaskT]):
    def __init__(
        self,
        task: TaskT,
        scopes: Sequence[str] | None = None,
        *,
        bind: bool | None = None,
        dpop: DpopKey | None = None,
    ) -> None:
        """Sends each request `task`'s token for its audience, with `scopes`
        (by default the task's), bound as `task.token` binds it by
        default, or as `bind` and `dpop` say."""
        self._task: TaskT = task
        self._scopes = scopes
        self._bind = bind
        self._dpop = dpop

    def _wants(self, request: httpx.Request) -> tuple[str, Sequence[str]]:
        """The audience and scopes of the token `request` needs."""
        info = self._task.info
        aud = audience_for(str(request.url), info.audiences)
        if aud is None:
            raise NoAudience(
                f"{request.url} is under none of the task's audiences {info.audiences}; "
                "no token was sent"
            )
        return aud, info.scopes if self._scopes is None else self._scopes

    def _authorize(self, request: httpx.Request, token: Token) -> None:
        request.headers["Authorization"] = token.authorization
        if self._dpop is not None:
            request.headers["DPoP"] = self._dpop.proof(
                request.method, str(request.url), token.value
            )

    def _refused(self, response: httpx.Response, token: Token) -> bool:
        """Whether the service refused `token` (which is then forgotten)."""
        refused = response.status_code == 401 and "invalid_token" in response.headers.get(
            "www-authenticate", ""
        )
        if refused:
            self._task.forget(token.lease_id)
        return refused


class TaskAuth(_TaskAuth[_Task]):
    """An `httpx.Auth` for `httpx.Client` that sends each request this
    task's token for the request's audience (see `mayfly.auth`)."""

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        aud, scopes = self._wants(request)
        token = self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
        self._authorize(request, token)
        if self._refused((yield request), token):
            self._authorize(
                request, self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
            )
            yield request


class AsyncTaskAuth(_TaskAuth[_AsyncTask]):
    """An `httpx.Auth` for `httpx.AsyncClient` that sends each request this
    task's token for the request's audience (see `mayfly.auth`)."""

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        aud, scopes = self._wants(request)
        token = await self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
        self._authorize(request, token)
        if self._refused((yield request), token):
            fresh = await self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
            self._authorize(request, fresh)
            yield request
