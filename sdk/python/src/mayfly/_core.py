"""The agent clients' core, sans I/O: what the blocking client (`client.py`)
and the asyncio client (`aio.py`) decide, written once, as flows (see
`mayfly._flow`): the token cache and when a token is renewed, waiting for
an approval, the requests and the answers' decoding, a task block's
start and completion, a workload token renewed on its refusal. The core
reads only the clocks it is given; it opens no socket or file and starts
no thread, so a test drives a flow with answers of its own. (It logs, to
the `mayfly` logger, a task it could not complete while its block was
raising.)

`TaskMethods` and `BrokerMethods` declare the clients' methods once; the
client classes add only what differs: running a flow, entering and
leaving a block, `auth`."""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, Concatenate, Generic, TypeVar
from urllib.parse import urlsplit

from google.protobuf.message import Message

from mayfly import _wire as w
from mayfly._flow import C, Call, Flow, Hold, P, Renew, adopt, operation, pure
from mayfly.config import Connection
from mayfly.dpop import DpopKey
from mayfly.errors import ApprovalDenied, ApprovalRequired, BrokerError, TaskEnded
from mayfly.types import Approval, ApprovalState, Certificate, DatabaseLogin, TaskInfo, Token
from mayfly.v1 import broker_pb2
from mayfly.workload_token import RENEWABLE

log = logging.getLogger("mayfly")

Resp = TypeVar("Resp", bound=Message)
# What may answer with an approval instead, and the requests that ask.
Issued = TypeVar("Issued", broker_pb2.IssuedToken, broker_pb2.DatabaseCredential)
IssueRequest = broker_pb2.IssueTokenRequest | broker_pb2.IssueDatabaseCredentialRequest

# --- decisions -------------------------------------------------------------

# The longest single WaitApproval the broker allows.
MAX_APPROVAL_WAIT = 60


def approval_wait(left: float) -> int:
    """How long the next WaitApproval asks to wait, `left` seconds before
    the caller gives up."""
    return max(0, min(MAX_APPROVAL_WAIT, int(left)))


def approved(approval: Approval) -> bool:
    """Whether an operator approved `approval` (False while pending);
    raises `ApprovalDenied` if it was refused or expired."""
    if approval.state == ApprovalState.APPROVED:
        return True
    if approval.state == ApprovalState.PENDING:
        return False
    raise ApprovalDenied(
        "PERMISSION_DENIED",
        f"approval_{approval.state}",
        f"approval {approval.approval_id} is {approval.state}"
        + (f" by {approval.decided_by}" if approval.decided_by else "")
        + (f": {approval.reason}" if approval.reason else ""),
        approval.approval_id,
        approval.reason,
    )


def binds_certificate(conn: Connection, bind: bool | None) -> bool:
    """`bind`, or by default: bound to the certificate if the agent has one."""
    return conn.has_certificate if bind is None else bind


def still_fresh(expires_at: dt.datetime, issued_at: float, now: float) -> bool:
    """Whether a cached token is handed out again: renewed once less than a
    fifth of its life (at most 30 s) is left, so a request never leaves
    with a token about to expire."""
    life = expires_at.timestamp() - issued_at
    margin = min(30.0, max(1.0, life / 5))
    return expires_at.timestamp() - now > margin


# Audience, scopes, and the binding: the client certificate (True), a DPoP
# key's thumbprint, or none (False).
CacheKey = tuple[str, frozenset[str], bool | str]


class TokenCache:
    """A task's tokens by audience, scopes and binding. `wall` is the clock
    the broker's expiry times are read against (seconds since the epoch)."""

    def __init__(self, wall: Callable[[], float] = time.time) -> None:
        self._wall = wall
        self._tokens: dict[CacheKey, tuple[Token, float]] = {}

    @staticmethod
    def key(audience: str, scopes: Sequence[str], binding: bool | str) -> CacheKey:
        return (audience, frozenset(scopes), binding)

    def get(self, key: CacheKey) -> Token | None:
        """The token held for `key` while it is fresh (`still_fresh`)."""
        held = self._tokens.get(key)
        if held is None or not still_fresh(held[0].expires_at, held[1], self._wall()):
            return None
        return held[0]

    def put(self, key: CacheKey, token: Token, issued_at: float) -> None:
        """Holds `token`, asked for at `issued_at` (its life starts then)."""
        self._tokens[key] = (token, issued_at)

    def forget(self, lease_id: str) -> None:
        self._tokens = {k: v for k, v in self._tokens.items() if v[0].lease_id != lease_id}

    def clear(self) -> None:
        self._tokens.clear()


def audience_for(url: str, audiences: Iterable[str]) -> str | None:
    """The task audience a request to `url` is for: the longest audience
    that is the URL's origin plus a path prefix of it. None when no audience
    covers the URL, so a token is never sent where it does not belong."""
    u = urlsplit(url)
    best: str | None = None
    for aud in audiences:
        a = urlsplit(aud)
        if (a.scheme, a.hostname, a.port) != (u.scheme, u.hostname, u.port) or not a.scheme:
            continue
        path = a.path.rstrip("/")
        if path and u.path != path and not u.path.startswith(path + "/"):
            continue
        if best is None or len(aud) > len(best):
            best = aud
    return best


# --- the flows ---------------------------------------------------------------

# The client's task class (`Task`, `AsyncTask`).
TaskT = TypeVar("TaskT", bound="TaskMethods")


class BrokerCore(Generic[TaskT]):
    """One agent's connection to the broker. `wrap` makes the client's task
    of a `TaskCore`, `new_lock` a lock of the client's kind; `clock`
    (monotonic) times approval waits, `wall` token lifetimes."""

    def __init__(
        self,
        conn: Connection,
        *,
        wrap: Callable[[TaskCore], TaskT],
        new_lock: Callable[[], object],
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.connection = conn
        self.wrap = wrap
        self.new_lock = new_lock
        self.clock = clock
        self.wall = wall

    def call(self, rpc: w.Rpc[Any, Resp], request: Message) -> Flow[Resp]:
        """One Broker RPC; a refusal raises its typed `BrokerError`. An agent
        with a workload token whose token was already used (on another
        connection) or has expired fetches a fresh one and tries once more."""
        try:
            response: Resp = yield Call(rpc, request)
            return response
        except BrokerError as error:
            source = self.connection.workload_token
            if source is None or error.error not in RENEWABLE:
                raise
        # The broker refused the token before doing anything.
        yield Renew(source)
        response = yield Call(rpc, request)
        return response

    def task(
        self,
        intent: str,
        *,
        audiences: Sequence[str],
        scopes: Sequence[str] = (),
        context: Mapping[str, str] | None = None,
        ttl: float | dt.timedelta | None = None,
    ) -> TaskT:
        """A task to open as a block (started on entry, completed on exit).
        `ttl` in seconds or a timedelta; None takes the broker's default."""
        request = w.start_request(intent, audiences, scopes, context, ttl)
        return self.wrap(TaskCore(self, request))

    def attach(self, task_id: str) -> Flow[TaskT]:
        """A task this agent already owns, e.g. one delegated to it."""
        got = yield from self.call(w.GET_TASK, broker_pb2.GetTaskRequest(task_id=task_id))
        return self.wrap(TaskCore(self, None, TaskInfo.from_pb(got)))

    def wait_for_approval(self, approval_id: str, timeout: float = 300) -> Flow[Approval]:
        """Waits until an operator decides. Returns the approved approval
        (repeat the request with its `approval_id`); raises `ApprovalDenied`
        if refused or expired, `TimeoutError` if still pending after
        `timeout` seconds."""
        deadline = self.clock() + timeout
        while True:
            left = deadline - self.clock()
            request = broker_pb2.WaitApprovalRequest(
                approval_id=approval_id, wait_seconds=approval_wait(left)
            )
            approval = Approval.from_pb((yield from self.call(w.WAIT_APPROVAL, request)))
            if approved(approval):
                return approval
            if left <= 1:
                raise TimeoutError(f"approval {approval_id} is still pending after {timeout} s")

    def call_approved(
        self,
        rpc: w.Rpc[Any, Issued],
        request: IssueRequest,
        wait_for_approval: float | None,
    ) -> Flow[tuple[Issued, float]]:
        """`rpc` with `request` (an issuing request with an `approval_id`),
        and the wall time it was sent at. An answer that is an approval
        raises `ApprovalRequired`, or with `wait_for_approval=seconds`
        waits for the operator and sends the request again with its id."""
        sent_at = self.wall()
        got = yield from self.call(rpc, request)
        if not got.HasField("approval"):
            return got, sent_at
        approval = Approval.from_pb(got.approval)
        if wait_for_approval is None:
            raise ApprovalRequired(approval)
        yield from self.wait_for_approval(approval.approval_id, wait_for_approval)
        request.approval_id = approval.approval_id
        sent_at = self.wall()
        return (yield from self.call(rpc, request)), sent_at


class TaskCore:
    """One task of the agent: what the broker last said of it, and the
    tokens issued under it."""

    def __init__(
        self,
        broker: BrokerCore[Any],
        request: broker_pb2.StartTaskRequest | None,
        info: TaskInfo | None = None,
    ) -> None:
        self._broker = broker
        self._request = request
        self._info = info
        self._tokens = TokenCache(broker.wall)
        self._locks: dict[CacheKey, object] = {}

    @property
    def info(self) -> TaskInfo:
        if self._info is None:
            raise RuntimeError("the task has not been started: enter its block or call start()")
        return self._info

    def start(self) -> Flow[TaskInfo]:
        """Starts the task (entering its block does)."""
        if self._info is not None:
            raise RuntimeError(f"task {self._info.task_id} is already started")
        if self._request is None:
            raise RuntimeError("nothing to start")
        got = yield from self._broker.call(w.START_TASK, self._request)
        self._info = TaskInfo.from_pb(got)
        return self._info

    def enter(self) -> Flow[None]:
        """Entering the task's block: starts it unless it was started."""
        if self._info is None:
            yield from self.start()

    def leave(self, error: BaseException | None) -> Flow[None]:
        """Leaving the task's block completes the task. If that fails while
        the block raised `error`, the block's exception is not hidden: the
        failure is logged, and the task ends at its expiry."""
        try:
            yield from self.complete()
        except Exception:
            if error is None:
                raise
            log.exception("could not complete task %s; it ends at its expiry", self.info.task_id)

    def complete(self) -> Flow[list[str]]:
        """Ends the task; returns the lease ids revoked (the task's own and
        every credential's). Completing an ended task does nothing."""
        self._tokens.clear()
        request = broker_pb2.CompleteTaskRequest(task_id=self.info.task_id)
        try:
            done = yield from self._broker.call(w.COMPLETE_TASK, request)
        except TaskEnded:
            return []
        self._info = TaskInfo.from_pb(done.task)
        return list(done.revoked_leases)

    def refresh(self) -> Flow[TaskInfo]:
        """The task as the broker now has it."""
        request = broker_pb2.GetTaskRequest(task_id=self.info.task_id)
        self._info = TaskInfo.from_pb((yield from self._broker.call(w.GET_TASK, request)))
        return self._info

    def token(
        self,
        audience: str,
        scopes: Sequence[str] = (),
        *,
        bind: bool | None = None,
        dpop: DpopKey | None = None,
        ttl: float | dt.timedelta | None = None,
        approval_id: str | None = None,
        wait_for_approval: float | None = None,
    ) -> Flow[Token]:
        """A token for `audience` with `scopes`, from the cache while it has
        enough life left. It is bound to this agent's certificate (RFC
        8705) if the agent has one (`bind=False` asks for a bearer token),
        so it is useless to anyone without the agent's key; `dpop` binds
        it to that DPoP key instead (RFC 9449; send it with
        `dpop.proof(...)`). If policy requires approval this raises
        `ApprovalRequired`, or with `wait_for_approval=seconds` waits for
        the operator and collects the token."""
        bind = dpop is None and binds_certificate(self._broker.connection, bind)
        key = TokenCache.key(audience, scopes, dpop.jkt if dpop else bind)
        # One request at a time per key: a second caller gets the first's token.
        yield Hold(self._locks.setdefault(key, self._broker.new_lock()))
        cached = self._tokens.get(key)
        if cached is not None and approval_id is None:
            return cached
        request = w.token_request(
            self.info.task_id,
            audience,
            scopes,
            bind=bind,
            dpop_jwk=dpop.public_jwk_json if dpop else None,
            ttl=ttl,
            approval_id=approval_id,
        )
        got, issued_at = yield from self._broker.call_approved(
            w.ISSUE_TOKEN, request, wait_for_approval
        )
        token = Token.from_pb(got)
        self._tokens.put(key, token, issued_at)
        return token

    def forget(self, lease_id: str) -> None:
        """Drops a cached token (e.g. one a service refused)."""
        self._tokens.forget(lease_id)

    def certificate(
        self, *, ttl: float | dt.timedelta | None = None, approval_id: str | None = None
    ) -> Flow[Certificate]:
        """An X.509-SVID of this task. The key pair is made here; only a CSR
        is sent. Raises `ApprovalRequired` when policy asks an operator."""
        key, csr = w.new_csr()
        request = w.certificate_request(self.info.task_id, csr, ttl, approval_id)
        got = yield from self._broker.call(w.SIGN_CERTIFICATE, request)
        if got.HasField("approval"):
            raise ApprovalRequired(Approval.from_pb(got.approval))
        return w.certificate(got, key)

    def database_login(
        self,
        database: str,
        scopes: Sequence[str] = (),
        *,
        ttl: float | dt.timedelta | None = None,
        approval_id: str | None = None,
        wait_for_approval: float | None = None,
    ) -> Flow[DatabaseLogin]:
        """A login in `database` (its configured name, e.g.
        "postgres://orders") granted `scopes`: a user and password made for
        this task and dropped from the database when its lease ends. Each
        call makes a new login (nothing is cached: a login is a secret).
        If policy requires approval this raises `ApprovalRequired`, or with
        `wait_for_approval=seconds` waits for the operator and collects
        the login."""
        request = w.database_login_request(self.info.task_id, database, scopes, ttl, approval_id)
        got, _ = yield from self._broker.call_approved(
            w.ISSUE_DATABASE_CREDENTIAL, request, wait_for_approval
        )
        return DatabaseLogin.from_pb(got)

    def update_context(
        self,
        set: Mapping[str, str] | None = None,
        remove: Iterable[str] | None = None,
    ) -> Flow[list[str]]:
        """Changes the task's context; returns the leases the broker revoked
        because policy no longer allows them (their cached tokens go too)."""
        request = w.context_request(self.info.task_id, set, remove)
        got = yield from self._broker.call(w.UPDATE_CONTEXT, request)
        self._info = TaskInfo.from_pb(got.task)
        for lease in got.revoked_leases:
            self.forget(lease)
        return list(got.revoked_leases)

    def delegate(
        self,
        to: str,
        *,
        intent: str,
        audiences: Sequence[str],
        scopes: Sequence[str],
        ttl: float | dt.timedelta | None = None,
    ) -> Flow[TaskInfo]:
        """Hands part of this task to agent `to` (a SPIFFE ID): a new task it
        owns, within this one's envelope, ending with it. The delegate picks
        it up with `broker.attach(task_id)`."""
        request = w.delegate_request(self.info.task_id, to, intent, audiences, scopes, ttl)
        return TaskInfo.from_pb((yield from self._broker.call(w.DELEGATE_TASK, request)))


# --- the clients' methods ---------------------------------------------------


class TaskMethods:
    """A client's task, blocking or asyncio: all of it but entering and
    leaving its block, which the client's own class adds."""

    def __init__(self, core: TaskCore) -> None:
        self._core = core

    def __repr__(self) -> str:
        info = self._core._info
        return f"{type(self).__name__}({info.task_id!r})" if info else f"{type(self).__name__}()"

    @property
    def info(self) -> TaskInfo:
        """The task as the broker last reported it (raises `RuntimeError`
        before it is started)."""
        return self._core.info

    @property
    def task_id(self) -> str:
        return self._core.info.task_id

    start = operation(TaskCore.start)
    complete = operation(TaskCore.complete)
    refresh = operation(TaskCore.refresh)
    token = operation(TaskCore.token)
    forget = pure(TaskCore.forget)
    certificate = operation(TaskCore.certificate)
    database_login = operation(TaskCore.database_login)
    update_context = operation(TaskCore.update_context)
    delegate = operation(TaskCore.delegate)


def starting(
    make: Callable[Concatenate[C, P], TaskT],
) -> Callable[Concatenate[C, P], Flow[TaskT]]:
    """The flow `start_task`, with the arguments of `make` (`BrokerCore.task`)."""

    def start_task(broker: C, /, *args: P.args, **kwargs: P.kwargs) -> Flow[TaskT]:
        """Starts a task now; end it with its `complete()`."""
        task = make(broker, *args, **kwargs)
        yield from task._core.start()
        return task

    return adopt(start_task, make, name="start_task", doc=start_task.__doc__)


class BrokerMethods(Generic[TaskT]):
    """A client's broker connection, blocking or asyncio: all of it but
    the I/O, which the client's own class adds."""

    def __init__(self, core: BrokerCore[TaskT]) -> None:
        self._core = core
        self.connection = core.connection

    task = pure(BrokerCore[TaskT].task)
    start_task = operation(starting(BrokerCore[TaskT].task))
    attach = operation(BrokerCore[TaskT].attach)
    wait_for_approval = operation(BrokerCore[TaskT].wait_for_approval)
