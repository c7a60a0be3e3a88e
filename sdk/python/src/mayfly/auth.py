"""`httpx.Auth` for a task: each request gets the task's token for the
audience its URL falls under (the longest envelope audience that is the
URL's origin and a path prefix), from the task's cache. A URL no audience
covers gets no token and raises, so a token never goes where it does not
belong. With a `DpopKey`, tokens are DPoP-bound and each request carries
a fresh proof. A 401 answer with `error="invalid_token"` (e.g. the token was
revoked) drops the token and retries once with a fresh one."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Generator, Sequence
from typing import TYPE_CHECKING

import httpx

from mayfly._shared import audience_for
from mayfly.dpop import DpopKey
from mayfly.errors import MayflyError
from mayfly.types import Token

if TYPE_CHECKING:
    from mayfly.aio import AsyncTask
    from mayfly.client import Task


class NoAudience(MayflyError):
    """The request's URL is under none of the task's audiences."""


def _audience(request: httpx.Request, audiences: Sequence[str]) -> str:
    aud = audience_for(str(request.url), audiences)
    if aud is None:
        raise NoAudience(
            f"{request.url} is under none of the task's audiences {list(audiences)}; "
            "no token was sent"
        )
    return aud


def _authorize(request: httpx.Request, token: Token, dpop: DpopKey | None) -> None:
    request.headers["Authorization"] = token.authorization
    if dpop is not None:
        request.headers["DPoP"] = dpop.proof(request.method, str(request.url), token.value)


def _token_refused(response: httpx.Response) -> bool:
    return response.status_code == 401 and "invalid_token" in response.headers.get(
        "www-authenticate", ""
    )


class TaskAuth(httpx.Auth):
    """For `httpx.Client`; made by `Task.auth()`."""

    def __init__(
        self, task: Task, scopes: Sequence[str] | None, *, bind: bool | None, dpop: DpopKey | None
    ) -> None:
        self._task = task
        self._scopes = scopes
        self._bind = bind
        self._dpop = dpop

    def sync_auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response]:
        info = self._task.info
        aud = _audience(request, info.audiences)
        scopes = info.scopes if self._scopes is None else self._scopes
        token = self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
        _authorize(request, token, self._dpop)
        response = yield request
        if _token_refused(response):
            self._task.forget(token.lease_id)
            token = self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
            _authorize(request, token, self._dpop)
            yield request


class AsyncTaskAuth(httpx.Auth):
    """For `httpx.AsyncClient`; made by `AsyncTask.auth()`."""

    def __init__(
        self,
        task: AsyncTask,
        scopes: Sequence[str] | None,
        *,
        bind: bool | None,
        dpop: DpopKey | None,
    ) -> None:
        self._task = task
        self._scopes = scopes
        self._bind = bind
        self._dpop = dpop

    async def async_auth_flow(
        self, request: httpx.Request
    ) -> AsyncGenerator[httpx.Request, httpx.Response]:
        info = self._task.info
        aud = _audience(request, info.audiences)
        scopes = info.scopes if self._scopes is None else self._scopes
        token = await self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
        _authorize(request, token, self._dpop)
        response = yield request
        if _token_refused(response):
            self._task.forget(token.lease_id)
            token = await self._task.token(aud, scopes, bind=self._bind, dpop=self._dpop)
            _authorize(request, token, self._dpop)
            yield request
