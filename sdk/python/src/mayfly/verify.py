"""Token verification for the services agents call: every check the Rust
`mayfly-verify` makes, against the broker's JWKS and its revocation feed.

    verifier = mayfly.Verifier(issuer="https://localhost:8711",
                               audience="https://api.example.com",
                               ca="bundle.pem",
                               feed=mayfly.FeedConfig.from_profile(".mayfly-dev", "api"))
    verifier.start()                       # or `with`, or let the first verify do it
    claims = verifier.verify(token, client_cert=peer_der)

Checks, in order: three parts; `alg` in the allow-list (ES256, EdDSA:
never `none`, HMAC or RSA); `typ` at+jwt; a `kid` the JWKS has (an
unknown one refreshes the JWKS, at most every 10 s), whose algorithm is the
header's; the signature; `iss`; exactly one `aud`, ours; `exp` and `nbf`
within the leeway; `sub`, `jti`, `task_id`; `cnf.x5t#S256` against the
presented certificate; `cnf.jkt` against a DPoP proof (RFC 9449: `typ`,
`alg`, its own public `jwk`, `htm`, `htu`, `iat` within 60 s, `ath`, `jti`
once); the feed: not revoked, and the feed heard from within `max_silence`
(else every token is refused: revocations may be missing)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import ssl
import threading
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from mayfly._jose import b64url, jwk_thumbprint
from mayfly.config import Connection, resolve
from mayfly.dpop import DpopRequest
from mayfly.errors import VerifyError
from mayfly.v1 import revocations_pb2

log = logging.getLogger("mayfly.verify")

ALGORITHMS = ("ES256", "EdDSA")
MAX_LEEWAY = 60.0
# How often an unknown `kid` may make the verifier fetch the JWKS.
MIN_REFRESH = 10.0
MAX_JWKS_BYTES = 256 * 1024
DPOP_MAX_AGE = 60
DPOP_PROOFS_REMEMBERED = 100_000


def cert_thumbprint(cert: bytes | str) -> str:
    """RFC 8705 `x5t#S256` of a certificate (DER bytes, or PEM text)."""
    der = (
        x509.load_pem_x509_certificate(cert.encode()).public_bytes(Encoding.DER)
        if isinstance(cert, str)
        else cert
    )
    return b64url(hashlib.sha256(der).digest())


@dataclass(frozen=True)
class FeedConfig:
    """How to follow the broker's revocation feed: its gRPC URL, the CA
    bundle, this service's own SVID (the broker lets workloads of its trust
    domain watch), and how long a silent feed is trusted."""

    broker: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    max_silence: float = 15.0

    @classmethod
    def from_profile(
        cls, profile: str | os.PathLike[str], identity: str, max_silence: float = 15.0
    ) -> FeedConfig:
        """From a `mayfly dev init` profile and one of its identities."""
        c = resolve(profile=profile, identity=identity)
        return cls(c.broker, c.ca_pem, c.cert_pem, c.key_pem, max_silence)


@dataclass(frozen=True)
class StatusListConfig:
    """Revocations from the broker's Token Status Lists
    (draft-ietf-oauth-status-list) instead of, or besides, the feed: the
    list each token names (only under the issuer's `/statuslists/`) is
    fetched over HTTPS, checked (signature against the JWKS, `typ`
    statuslist+jwt, `iss`, `sub` equal to its URI, `exp`) and kept for its
    `ttl`, at most `max_ttl` seconds. Once a copy is that old, a list that
    cannot be fetched refuses its tokens (`status_unavailable`): fail
    closed."""

    max_ttl: float = 60.0
    max_bytes: int = 1 << 20


@dataclass(frozen=True)
class VerifiedToken:
    """A token that passed every check. `agent` is `sub` (the task's
    owner); `actor` the RFC 8693 `act` claim when a delegate or a service
    acts for it."""

    agent: str
    task_id: str
    lease_id: str
    scopes: list[str]
    audience: str
    expires_at: int
    actor: dict[str, Any] | None
    bound_to: str | None
    dpop_key: str | None
    claims: dict[str, Any] = field(repr=False)

    def has_scope(self, scope: str) -> bool:
        return scope in self.scopes

    @property
    def actor_id(self) -> str:
        """Who is acting: the outermost `act.sub`, else the agent."""
        return str(self.actor["sub"]) if self.actor and "sub" in self.actor else self.agent


# A list of 2^20 one-bit entries, the largest the broker serves.
MAX_STATUS_LIST_BYTES = 1 << 17


class _StatusLists:
    """The status lists held, by URI: their bits and until when each is
    fresh."""

    def __init__(self, issuer: str, config: StatusListConfig) -> None:
        self.prefix = issuer.rstrip("/") + "/statuslists/"
        self.config = config
        self.held: dict[str, tuple[bytes, float]] = {}
        self.lock = threading.Lock()
        self.fetches = 0

    def ref(self, claims: dict[str, Any]) -> tuple[str, int]:
        """The token's list and index, which must be one of the issuer's."""
        status = claims.get("status")
        ref = status.get("status_list") if isinstance(status, dict) else None
        if not isinstance(ref, dict):
            raise VerifyError("status_missing", "the token names no status list")
        uri, idx = ref.get("uri"), ref.get("idx")
        if (
            not isinstance(uri, str)
            or not uri.startswith(self.prefix)
            or not uri[len(self.prefix) :].isdigit()
            or not isinstance(idx, int)
            or isinstance(idx, bool)
            or idx < 0
        ):
            raise VerifyError("status_missing", "the token's status list is not the issuer's")
        return uri, idx

    def fresh(self, uri: str) -> bytes | None:
        held = self.held.get(uri)
        return held[0] if held is not None and time.monotonic() < held[1] else None

    def fetch(self, uri: str, http: httpx.Client, verifier: Verifier) -> bytes:
        """The list at `uri`, fetched and checked; raises
        `status_unavailable` (server-side) when it cannot be had."""
        with self.lock:
            bits = self.fresh(uri)
            if bits is not None:
                return bits
            try:
                bits, ttl = self._get(uri, http, verifier)
            except (httpx.HTTPError, ValueError, jwt.PyJWTError, zlib.error) as e:
                raise VerifyError(
                    "status_unavailable", f"status list {uri}: {e}", server_side=True
                ) from e
            self.held[uri] = (bits, time.monotonic() + ttl)
            self.fetches += 1
            return bits

    def _get(self, uri: str, http: httpx.Client, verifier: Verifier) -> tuple[bytes, float]:
        r = http.get(uri, headers={"Accept": "application/statuslist+jwt"})
        r.raise_for_status()
        if len(r.content) > self.config.max_bytes:
            raise ValueError(f"larger than {self.config.max_bytes} bytes")
        token = r.text
        header = _header(token)
        if header.get("typ") != "statuslist+jwt":
            raise ValueError(f"typ {header.get('typ')!r} is not statuslist+jwt")
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in ALGORITHMS or not isinstance(kid, str):
            raise ValueError(f"alg {alg!r} is not accepted")
        key = verifier._keys.get(kid)
        if key is None and verifier.refresh_keys():
            key = verifier._keys.get(kid)
        if key is None or key.algorithm_name != alg:
            raise ValueError(f"kid {kid!r} is not an {alg} key of the issuer")
        claims = jwt.decode(
            token,
            key.key,
            algorithms=[alg],
            issuer=verifier.issuer,
            leeway=verifier._leeway,
            options={"require": ["sub", "iat", "exp"]},
        )
        if claims["sub"] != uri:
            raise ValueError("its sub is not its URI")
        body = claims.get("status_list")
        if not isinstance(body, dict) or body.get("bits") != 1:
            raise ValueError("not a status list of one bit per token")
        lst = body.get("lst")
        if not isinstance(lst, str):
            raise ValueError("lst is missing")
        inflate = zlib.decompressobj()
        bits = inflate.decompress(
            base64.urlsafe_b64decode(lst + "=" * (-len(lst) % 4)), MAX_STATUS_LIST_BYTES + 1
        )
        if len(bits) > MAX_STATUS_LIST_BYTES or inflate.unconsumed_tail:
            raise ValueError(f"lst inflates past {MAX_STATUS_LIST_BYTES} bytes")
        ttl = claims.get("ttl")
        keep = float(ttl) if isinstance(ttl, (int, float)) and ttl > 0 else 0.0
        keep = min(keep, self.config.max_ttl, float(claims["exp"]) - time.time())
        return bits, max(keep, 0.0)


class _Revocations:
    """Revoked, unexpired credentials from the feed, and when it was last
    heard from."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.leases: dict[str, float] = {}
        self.serials: dict[str, float] = {}
        self.cursor = 0
        self.last_heard: float | None = None  # monotonic; None until synced

    def apply(self, e: revocations_pb2.RevocationEvent) -> None:
        now = time.monotonic()
        with self._lock:
            if e.heartbeat:
                # The first heartbeat follows the replay of everything
                # revoked: from here on the set is complete.
                self.last_heard = now
                cutoff = time.time() - 60
                self.leases = {k: v for k, v in self.leases.items() if v > cutoff}
                self.serials = {k: v for k, v in self.serials.items() if v > cutoff}
            else:
                exp = float(e.expires_at.seconds)
                if e.lease_id:
                    self.leases[e.lease_id] = exp
                if e.serial:
                    self.serials[e.serial.upper()] = exp
                if self.last_heard is not None:
                    self.last_heard = now
            self.cursor = max(self.cursor, e.cursor)

    def silence(self) -> float | None:
        heard = self.last_heard
        return None if heard is None else time.monotonic() - heard


class _Follower(threading.Thread):
    """Streams the feed into a `_Revocations`, reconnecting from its cursor
    with backoff; stops when `stop()` is called."""

    def __init__(self, config: FeedConfig, revs: _Revocations) -> None:
        super().__init__(name="mayfly-revocation-feed", daemon=True)
        self._config = config
        self._revs = revs
        self._stopping = threading.Event()
        self._call: Any = None
        creds = grpc.ssl_channel_credentials(
            root_certificates=config.ca_pem,
            private_key=config.key_pem,
            certificate_chain=config.cert_pem,
        )
        target = Connection(config.broker, b"", b"", b"").target
        self._channel = grpc.secure_channel(target, creds)
        svc = revocations_pb2.DESCRIPTOR.services_by_name["Revocations"]
        self._watch = self._channel.unary_stream(
            f"/{svc.full_name}/{svc.methods_by_name['WatchRevocations'].name}",
            request_serializer=revocations_pb2.WatchRequest.SerializeToString,
            response_deserializer=revocations_pb2.RevocationEvent.FromString,
        )

    def run(self) -> None:
        backoff = 0.1
        while not self._stopping.is_set():
            try:
                self._call = self._watch(
                    revocations_pb2.WatchRequest(from_cursor=self._revs.cursor)
                )
                for event in self._call:
                    self._revs.apply(event)
                    backoff = 0.1
            except grpc.RpcError as e:
                if self._stopping.is_set():
                    return
                code = e.code() if isinstance(e, grpc.Call) else None
                log.warning(
                    "revocation feed disconnected (%s); reconnecting from cursor %d",
                    code,
                    self._revs.cursor,
                )
            self._stopping.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def stop(self) -> None:
        self._stopping.set()
        if self._call is not None:
            self._call.cancel()
        self._channel.close()


class _ReplayCache:
    """DPoP proof `jti`s seen within the proof window, bounded: when full of
    live entries it refuses rather than forgets."""

    def __init__(self, capacity: int) -> None:
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._capacity = capacity
        self._lock = threading.Lock()

    def check(self, jkt: str, jti: str, iat: float) -> None:
        now = time.time()
        key = f"{jkt}:{jti}"
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - 2 * DPOP_MAX_AGE:
                self._seen.popitem(last=False)
            if key in self._seen:
                raise VerifyError("dpop_replayed", "DPoP proof jti was already used")
            if len(self._seen) >= self._capacity:
                raise VerifyError("dpop_busy", "too many DPoP proofs in flight; retry")
            self._seen[key] = max(iat, now)


class Verifier:
    """Checks Mayfly access tokens for one audience. Thread-safe.

    Making one does no I/O and starts no thread. `start()` fetches the
    JWKS and starts following the feed; entering `with` calls it, and so
    does the first `verify` if neither did. `close()` (or leaving `with`)
    stops the feed follower."""

    def __init__(
        self,
        *,
        issuer: str,
        audience: str,
        ca: str | os.PathLike[str] | bytes | None = None,
        jwks_url: str | None = None,
        feed: FeedConfig | None = None,
        status_lists: StatusListConfig | None = None,
        leeway: float = 5.0,
        jwks_refresh: float = 300.0,
        jwks: dict[str, Any] | None = None,
        min_refresh: float = MIN_REFRESH,
    ) -> None:
        """The JWKS comes from `jwks_url` (by default the issuer's
        `/.well-known/jwks.json`, trusting `ca`: a file, or PEM bytes)
        unless `jwks` pins a key set; revocations from `feed` and from the
        Token Status Lists (`status_lists`), each if given. With neither,
        revocations are not seen (tokens live to their expiry). An unknown
        `kid` refetches the JWKS at most every `min_refresh` seconds, so a
        flood of forged kids cannot turn into a flood of fetches; a first
        fetch that failed is likewise tried again by `verify` at most every
        `min_refresh` seconds."""
        self.issuer = issuer
        self.audience = audience
        self._leeway = min(max(leeway, 0.0), MAX_LEEWAY)
        self._jwks_url = jwks_url or issuer.rstrip("/") + "/.well-known/jwks.json"
        self._refresh_every = jwks_refresh
        self._min_refresh = min_refresh
        self.jwks_fetches = 0
        verify: ssl.SSLContext | bool = True
        if isinstance(ca, bytes):
            verify = ssl.create_default_context(cadata=ca.decode("ascii"))
        elif ca is not None:
            verify = ssl.create_default_context(cafile=os.fspath(ca))
        self._http = httpx.Client(verify=verify, timeout=5.0)
        self._keys: dict[str, jwt.PyJWK] = {}
        # Whether a key set is held (pinned, or fetched once).
        self._have_keys = jwks is not None
        self._fetched_at = 0.0
        self._refresh_lock = threading.Lock()
        self._refreshing = False
        # When the first fetch last failed, and how: `verify` says so again
        # rather than fetch more than once per `min_refresh`.
        self._first_failure: tuple[float, VerifyError] | None = None
        self._dpop_seen = _ReplayCache(DPOP_PROOFS_REMEMBERED)
        self._feed = feed
        self._revs = _Revocations() if feed is not None else None
        self._max_silence = feed.max_silence if feed is not None else 0.0
        self._follower: _Follower | None = None
        self._lists = _StatusLists(issuer, status_lists) if status_lists is not None else None
        # Guards starting the follower against closing, and the first fetch.
        self._start_lock = threading.Lock()
        self._closed = False
        # Set once both are done: `verify`'s fast path.
        self._started = False
        if jwks is not None:
            self._keys = self._parse_jwks(jwks)
            self._fetched_at = float("inf")

    def __repr__(self) -> str:
        return f"Verifier(issuer={self.issuer!r}, audience={self.audience!r})"

    def start(self) -> None:
        """Starts following the feed (a thread), if there is one, and
        fetches the JWKS, unless a key set is held. A JWKS that cannot be
        fetched raises `VerifyError` (`jwks_unavailable`, server-side); the
        feed is followed regardless, and `start()` or `verify` tries the
        fetch again. Once started, calling it again does nothing."""
        self._ready(eager=True)

    def _ready(self, *, eager: bool = False) -> None:
        """What `start()` does; on the lazy path (`eager` false) a first
        fetch that failed less than `min_refresh` ago fails again at once."""
        self._follow()
        with self._start_lock:
            if not self._have_keys:
                failed = self._first_failure
                if not eager and failed and time.monotonic() - failed[0] < self._min_refresh:
                    raise VerifyError(failed[1].check, failed[1].detail, server_side=True)
                try:
                    self.refresh_keys(force=True)
                except VerifyError as e:
                    self._first_failure = (time.monotonic(), e)
                    raise
            self._started = True

    def _follow(self) -> None:
        """Starts the feed follower, if there is a feed and it is not
        followed yet."""
        with self._start_lock:
            if self._follower is not None:
                return
            if self._closed:
                raise RuntimeError("the verifier is closed")
            if self._feed is not None and self._revs is not None:
                self._follower = _Follower(self._feed, self._revs)
                self._follower.start()

    def close(self) -> None:
        """Stops the feed follower and the JWKS client; a closed verifier
        cannot be started."""
        with self._start_lock:
            self._closed = True
            follower = self._follower
        if follower is not None:
            follower.stop()
        self._http.close()

    def __enter__(self) -> Verifier:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- keys -----------------------------------------------------------

    @staticmethod
    def _parse_jwks(doc: dict[str, Any]) -> dict[str, jwt.PyJWK]:
        keys: dict[str, jwt.PyJWK] = {}
        for k in doc.get("keys", []):
            if not isinstance(k, dict) or "kid" not in k or k.get("alg") not in ALGORITHMS:
                continue
            try:
                keys[str(k["kid"])] = jwt.PyJWK(k)
            except jwt.PyJWTError:
                continue
        return keys

    def refresh_keys(self, *, force: bool = False) -> bool:
        """Fetches the JWKS if `force`, or if the last fetch is older than
        `min_refresh` (for an unknown `kid`). Returns whether it fetched. A
        failed fetch keeps the keys held and raises `jwks_unavailable`."""
        with self._refresh_lock:
            if not force and time.monotonic() - self._fetched_at < self._min_refresh:
                return False
            try:
                r = self._http.get(self._jwks_url)
                r.raise_for_status()
                if len(r.content) > MAX_JWKS_BYTES:
                    raise ValueError(f"JWKS larger than {MAX_JWKS_BYTES} bytes")
                doc = r.json()
            except (httpx.HTTPError, ValueError) as e:
                raise VerifyError(
                    "jwks_unavailable", f"cannot fetch {self._jwks_url}: {e}", server_side=True
                ) from e
            self._keys = self._parse_jwks(doc)
            self._have_keys = True
            self._fetched_at = time.monotonic()
            self.jwks_fetches += 1
            return True

    def _maybe_refresh_in_background(self) -> None:
        """Once the JWKS is older than `jwks_refresh`, fetches it again in a
        thread (a request never waits for it; a failed fetch keeps the keys
        held and is tried again at the next interval)."""
        if time.monotonic() - self._fetched_at < self._refresh_every or self._refreshing:
            return
        self._refreshing = True

        def run() -> None:
            try:
                self.refresh_keys(force=True)
            except VerifyError as e:
                log.warning("JWKS refresh failed, keeping the keys held: %s", e.detail)
                with self._refresh_lock:
                    self._fetched_at = time.monotonic()
            finally:
                self._refreshing = False

        threading.Thread(target=run, name="mayfly-jwks-refresh", daemon=True).start()

    # --- feed -----------------------------------------------------------

    def wait_for_feed(self, timeout: float = 10.0) -> bool:
        """Whether the feed delivered its first full replay within `timeout`
        (true at once without a feed). Starts following it if nothing has
        yet; fetches no JWKS."""
        if self._revs is None:
            return True
        self._follow()
        deadline = time.monotonic() + timeout
        while self._revs.silence() is None:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    @property
    def feed_cursor(self) -> int:
        return 0 if self._revs is None else self._revs.cursor

    def is_certificate_revoked(self, serial: str) -> bool:
        return self._revs is not None and serial.upper() in self._revs.serials

    # --- verification ---------------------------------------------------

    def verify(
        self,
        token: str,
        *,
        client_cert: bytes | str | None = None,
        dpop: DpopRequest | None = None,
    ) -> VerifiedToken:
        """Checks `token` as presented: as a bearer token (`dpop=None`), or
        with the DPoP scheme (`dpop`: the request's proof, method and URL).
        `client_cert` is the certificate the caller presented over TLS
        (DER, or PEM), needed for certificate-bound tokens. Raises
        `VerifyError` naming the check that failed. Starts the verifier if
        nothing has yet (`start()`)."""
        if not self._started:
            self._ready()
        held = self._check_held(token, client_cert, dpop)
        checked = held if held is not None else self._check_fresh(token, client_cert, dpop)
        if self._lists is not None:
            self._check_status(checked)
        return checked

    async def averify(
        self,
        token: str,
        *,
        client_cert: bytes | str | None = None,
        dpop: DpopRequest | None = None,
    ) -> VerifiedToken:
        """`verify` for an event loop, raising as it does: the checks run
        inline; what may wait on the network (starting, a JWKS refetch for
        an unknown `kid`) runs in a worker thread."""
        if not self._started:
            await asyncio.to_thread(self._ready)
        held = self._check_held(token, client_cert, dpop)
        checked = (
            held
            if held is not None
            else await asyncio.to_thread(self._check_fresh, token, client_cert, dpop)
        )
        if self._lists is not None:
            lists = self._lists
            uri, _ = lists.ref(checked.claims)
            if lists.fresh(uri) is None:
                await asyncio.to_thread(lists.fetch, uri, self._http, self)
            self._check_status(checked)
        return checked

    def _check_status(self, checked: VerifiedToken) -> None:
        """The token's bit in its status list (fetched when the copy held
        is older than its `ttl`; `averify` fetches in a worker thread
        first): 1, or an index past the list, is revoked."""
        lists = self._lists
        if lists is None:
            return
        uri, idx = lists.ref(checked.claims)
        bits = lists.fresh(uri)
        if bits is None:
            bits = lists.fetch(uri, self._http, self)
        if idx // 8 >= len(bits) or bits[idx // 8] >> (idx % 8) & 1:
            raise VerifyError("revoked", "the token's status list marks it revoked")

    def _check_held(
        self, token: str, client_cert: bytes | str | None, dpop: DpopRequest | None
    ) -> VerifiedToken | None:
        """The checks against the keys held; None when the token names a
        `kid` they lack, which a refetch may find."""
        self._maybe_refresh_in_background()
        try:
            return self._check(token, client_cert, dpop)
        except VerifyError as e:
            if e.check != "unknown_key" or not self._kid_of(token):
                raise
        return None

    def _check_fresh(
        self, token: str, client_cert: bytes | str | None, dpop: DpopRequest | None
    ) -> VerifiedToken:
        """The checks again after refetching the JWKS (at most every
        `min_refresh` seconds)."""
        self.refresh_keys()
        return self._check(token, client_cert, dpop)

    @staticmethod
    def _kid_of(token: str) -> str | None:
        try:
            kid = _header(token).get("kid")
        except VerifyError:
            return None
        return kid if isinstance(kid, str) else None

    def refused_lease(self, token: str) -> str | None:
        """The lease (`jti`) of a refused `token`, if it is one of the
        issuer's for this audience whose signature verifies (refused for
        its time, revocation or binding): what a service may report the
        refusal under. `None` for anything else, whose `jti` could be
        anyone's."""
        try:
            header = _header(token)
            kid = header.get("kid")
            key = self._keys.get(kid) if isinstance(kid, str) else None
            alg = header.get("alg")
            if key is None or alg not in ALGORITHMS or key.algorithm_name != alg:
                return None
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                options={"verify_exp": False, "verify_nbf": False, "verify_iat": False},
            )
        except (VerifyError, jwt.PyJWTError):
            return None
        jti = claims.get("jti")
        if claims.get("aud") != self.audience or not isinstance(jti, str) or not jti:
            return None
        return jti

    def _check(
        self, token: str, client_cert: bytes | str | None, dpop: DpopRequest | None
    ) -> VerifiedToken:
        if token.count(".") != 2:
            raise VerifyError("malformed", "expected three dot-separated parts")
        header = _header(token)
        # Allow-list first: `none`, HS*, RS* never reach a key.
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise VerifyError("algorithm", f"alg {alg!r} is not accepted (ES256 or EdDSA)")
        typ = header.get("typ")
        if not isinstance(typ, str) or typ.lower() not in ("at+jwt", "application/at+jwt"):
            raise VerifyError("wrong_type", f"typ {typ!r} is not at+jwt")
        kid = header.get("kid")
        key = self._keys.get(kid) if isinstance(kid, str) else None
        if key is None:
            raise VerifyError("unknown_key", f"kid {kid!r} is not in the issuer's JWKS")
        if key.algorithm_name != alg:
            raise VerifyError(
                "key_algorithm_mismatch", f"kid {kid!r} is a {key.algorithm_name} key, not {alg}"
            )
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=self.audience,
                issuer=self.issuer,
                leeway=self._leeway,
                options={"require": ["exp", "iss", "aud", "sub", "nbf", "jti"]},
            )
        except jwt.InvalidSignatureError:
            raise VerifyError("bad_signature", "the signature does not verify") from None
        except jwt.ExpiredSignatureError:
            raise VerifyError("expired", "exp has passed") from None
        except jwt.ImmatureSignatureError:
            raise VerifyError("not_yet_valid", "nbf is in the future") from None
        except jwt.InvalidIssuerError:
            raise VerifyError("wrong_issuer", f"iss is not {self.issuer}") from None
        except jwt.InvalidAudienceError:
            raise VerifyError("wrong_audience", f"aud is not {self.audience}") from None
        except jwt.MissingRequiredClaimError as e:
            raise VerifyError("missing_claim", f"claim {e.claim} is missing") from None
        except jwt.PyJWTError as e:
            raise VerifyError("malformed", str(e)) from None
        # Exactly one audience, ours (Mayfly tokens carry one).
        if claims.get("aud") != self.audience:
            raise VerifyError("wrong_audience", f"aud must be exactly {self.audience}")
        for name in ("sub", "jti", "task_id"):
            if not isinstance(claims.get(name), str) or not claims[name]:
                raise VerifyError("missing_claim", f"claim {name} is missing")
        if not claims["sub"].startswith("spiffe://"):
            raise VerifyError("malformed", "claim sub is not a SPIFFE ID")
        raw_cnf = claims.get("cnf")
        cnf: dict[str, Any] = raw_cnf if isinstance(raw_cnf, dict) else {}
        bound_to = cnf.get("x5t#S256")
        jkt = cnf.get("jkt")
        if bound_to is not None:
            if client_cert is None:
                raise VerifyError(
                    "certificate_required", "the token is bound to a client certificate"
                )
            if cert_thumbprint(client_cert) != bound_to:
                raise VerifyError(
                    "certificate_mismatch", "the presented certificate is not the bound one"
                )
        if dpop is None and jkt is not None:
            raise VerifyError("dpop_required", "a DPoP-bound token came as a bearer token")
        if dpop is not None:
            if jkt is None:
                raise VerifyError("not_dpop_bound", "the DPoP scheme with an unbound token")
            self._check_proof(token, dpop, str(jkt))
        if self._revs is not None:
            silence = self._revs.silence()
            if silence is None:
                raise VerifyError(
                    "feed_not_synced",
                    "the revocation feed has not delivered its replay yet",
                    server_side=True,
                )
            if silence > self._max_silence:
                raise VerifyError(
                    "feed_stale",
                    f"no word from the revocation feed for {silence:.1f} s",
                    server_side=True,
                )
            if claims["jti"] in self._revs.leases:
                raise VerifyError("revoked", "the broker revoked this token")
        scope = claims.get("scope")
        act = claims.get("act")
        return VerifiedToken(
            agent=claims["sub"],
            task_id=claims["task_id"],
            lease_id=claims["jti"],
            scopes=[s for s in scope.split(" ") if s] if isinstance(scope, str) else [],
            audience=self.audience,
            expires_at=int(claims["exp"]),
            actor=act if isinstance(act, dict) else None,
            bound_to=bound_to,
            dpop_key=jkt,
            claims=claims,
        )

    def _check_proof(self, token: str, dpop: DpopRequest, jkt: str) -> None:
        proof, method, url = dpop.proof, dpop.method, dpop.url
        if len(proof) > 4096 or proof.count(".") != 2:
            raise VerifyError("dpop_malformed", "the DPoP proof is not a compact JWS")
        try:
            header = jwt.get_unverified_header(proof)
        except jwt.PyJWTError as e:
            raise VerifyError("dpop_malformed", str(e)) from None
        if header.get("typ") != "dpop+jwt":
            raise VerifyError("dpop_type", 'DPoP proof typ must be "dpop+jwt"')
        alg = header.get("alg")
        if alg not in ALGORITHMS:
            raise VerifyError("dpop_algorithm", f"DPoP proof alg {alg!r} is not accepted")
        jwk = header.get("jwk")
        if not isinstance(jwk, dict) or "d" in jwk:
            raise VerifyError("dpop_key", "DPoP proof jwk is missing or private")
        want_kty = ("EC", "P-256") if alg == "ES256" else ("OKP", "Ed25519")
        if (jwk.get("kty"), jwk.get("crv")) != want_kty:
            raise VerifyError("dpop_key", f"DPoP proof jwk is not a {want_kty[1]} key for {alg}")
        try:
            key = jwt.PyJWK(jwk, algorithm=alg)
            claims: dict[str, Any] = jwt.decode(
                proof, key.key, algorithms=[alg], options={"verify_aud": False}
            )
        except jwt.InvalidSignatureError:
            raise VerifyError("dpop_signature", "DPoP proof signature does not verify") from None
        except jwt.PyJWTError as e:
            raise VerifyError("dpop_malformed", str(e)) from None
        jti, htm, htu, iat = (claims.get(k) for k in ("jti", "htm", "htu", "iat"))
        if not isinstance(jti, str) or not 0 < len(jti) <= 256:
            raise VerifyError("dpop_malformed", "DPoP proof jti must be 1 to 256 bytes")
        if htm != method:
            raise VerifyError("dpop_method", f"DPoP proof htm {htm!r} is not {method}")
        if not isinstance(htu, str) or _norm_url(htu) != _norm_url(url):
            raise VerifyError("dpop_url", f"DPoP proof htu {htu!r} is not {url}")
        if not isinstance(iat, int | float):
            raise VerifyError("dpop_malformed", "DPoP proof iat is missing")
        now = time.time()
        if now - iat > DPOP_MAX_AGE:
            raise VerifyError("dpop_stale", f"DPoP proof iat is {now - iat:.0f} s ago")
        if iat - now > DPOP_MAX_AGE:
            raise VerifyError("dpop_future", f"DPoP proof iat is {iat - now:.0f} s ahead")
        if claims.get("ath") != b64url(hashlib.sha256(token.encode()).digest()):
            raise VerifyError("dpop_ath", "DPoP proof ath does not match the access token")
        thumb = jwk_thumbprint(jwk)
        if thumb != jkt:
            raise VerifyError("dpop_wrong_key", "DPoP proof key is not the token's cnf.jkt")
        self._dpop_seen.check(thumb, jti, float(iat))


def _header(token: str) -> dict[str, Any]:
    """The JOSE header, read alone (PyJWT's `get_unverified_header` decodes
    the whole token; the signature check decodes it again anyway)."""
    h = token.split(".", 1)[0]
    try:
        header = json.loads(base64.urlsafe_b64decode(h + "=" * (-len(h) % 4)))
    except (ValueError, TypeError):
        raise VerifyError("malformed", "header is not base64url JSON") from None
    if not isinstance(header, dict):
        raise VerifyError("malformed", "header is not a JSON object")
    return header


def _norm_url(u: str) -> str:
    """Scheme and host lower-cased, default port dropped, no query or
    fragment (RFC 9449 §4.3)."""
    u = u.split("?", 1)[0].split("#", 1)[0]
    scheme, sep, rest = u.partition("://")
    if not sep:
        return u
    authority, slash, path = rest.partition("/")
    authority = authority.lower()
    default = {"https": ":443", "http": ":80"}.get(scheme.lower())
    if default and authority.endswith(default):
        authority = authority[: -len(default)]
    return f"{scheme.lower()}://{authority}/{path if slash else ''}"
