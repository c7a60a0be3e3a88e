"""Agents without a client certificate: a signed workload token (a
Kubernetes projected service-account token, a SPIFFE JWT-SVID, a CI or
cloud OIDC token) proves the agent instead, if the broker trusts its issuer
(`[[federation]]`). It travels as `authorization: Bearer` on every call
over server-authenticated TLS.

A `WorkloadToken` is where the token comes from: a file (re-read once the
token it held is close to expiry, as the kubelet rotates it) or a callable
that fetches a new one. The broker accepts a token with a `jti` once per
cluster unless its issuer is configured otherwise; when it answers that the
token was already used or has expired, the client fetches a fresh one and
tries the call once more.

The token is never logged, and `repr` does not show it."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from pathlib import Path

import jwt

from mayfly.errors import ConfigError

# A token this close to its `exp` is fetched again before it is sent.
RENEW_MARGIN = 30.0

# The broker's names for a refusal that a fresh token may cure.
RENEWABLE = frozenset({"workload_token_used", "workload_token_expired"})


def _expiry(token: str) -> float | None:
    """The token's `exp`, read without verifying it (the broker verifies):
    only to know when to fetch the next one."""
    try:
        claims = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return None
    exp = claims.get("exp")
    return float(exp) if isinstance(exp, (int, float)) else None


class WorkloadToken:
    """A source of the agent's workload token. Make it with `from_file` or
    `from_callable` and pass it as `mayfly.connect(token=...)`; one source
    may serve several connections."""

    def __init__(self, fetch: Callable[[], str], *, name: str) -> None:
        self._fetch = fetch
        self._name = name
        self._lock = threading.Lock()
        self._token: str | None = None
        self._expires: float | None = None

    def __repr__(self) -> str:
        return f"WorkloadToken({self._name})"

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> WorkloadToken:
        """The token in `path` (e.g. a projected service-account token,
        `/var/run/secrets/tokens/mayfly`). It is read now, so a missing
        file fails here with `ConfigError`, and again whenever a fresh
        token is needed."""
        p = Path(path)

        def read() -> str:
            try:
                return p.read_text(encoding="ascii")
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"cannot read the workload token file {p}: {e}") from e

        source = cls(read, name=f"file {p}")
        source.renew()
        return source

    @classmethod
    def from_callable(cls, fetch: Callable[[], str], *, name: str = "callable") -> WorkloadToken:
        """Tokens from `fetch()`, called for the first token and whenever a
        fresh one is needed (e.g. a request to a CI runner's OIDC endpoint,
        or the SPIFFE Workload API's FetchJWTSVID)."""
        return cls(fetch, name=name)

    def current(self) -> str:
        """The token to send: the one held, unless it is about to expire."""
        with self._lock:
            token, expires = self._token, self._expires
        if token is not None and (expires is None or expires - time.time() > RENEW_MARGIN):
            return token
        return self.renew()

    def renew(self) -> str:
        """Fetches a new token and holds it from now on."""
        token = self._fetch().strip()
        if not token:
            raise ConfigError(f"the workload token from {self._name} is empty")
        with self._lock:
            self._token, self._expires = token, _expiry(token)
        return token

    def header(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the current token."""
        return (("authorization", f"Bearer {self.current()}"),)
