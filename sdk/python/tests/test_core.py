"""The agent clients' core without a broker: its flows driven here with
scripted answers and clocks of the test's own. The token cache (keyed by
audience, scopes and binding, renewed before expiry), waiting for an
approval, a workload token renewed on its refusal, a task block's
completion rules, the states as enums, one definition of each method for
both clients, and no import cycle among the package's modules."""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp

import mayfly
from mayfly import _core as core
from mayfly import _wire as w
from mayfly._flow import Call, Flow, Hold, Renew, Run
from mayfly.errors import BrokerError, TaskEnded, Unauthenticated, from_status
from mayfly.v1 import broker_pb2, types_pb2

T = TypeVar("T")
API = "https://api.example.com"
EPOCH = 1_800_000_000.0
SRC = Path(mayfly.__file__).parent


def stamp(seconds: float) -> Timestamp:
    ts = Timestamp()
    ts.FromSeconds(int(seconds))
    return ts


@dataclass
class Clock:
    now: float

    def __call__(self) -> float:
        return self.now


Outcome = Message | BrokerError


@dataclass
class Broker:
    """Answers a flow's calls from a script of (rpc, response or refusal),
    in order, and keeps what was sent. A WaitApproval moves both clocks on
    by the seconds it asked to wait."""

    script: list[tuple[w.Rpc[Any, Any], Outcome]]
    clock: Clock = field(default_factory=lambda: Clock(0.0))
    wall: Clock = field(default_factory=lambda: Clock(EPOCH))
    sent: list[Message] = field(default_factory=list)
    renewals: int = 0
    held: list[object] = field(default_factory=list)

    def run(self, flow: Flow[T]) -> T:
        run = Run(flow)
        for op in run.requests():
            with run.answer() as answer:
                if isinstance(op, Call):
                    answer.value = self._call(op)
                elif isinstance(op, Renew):
                    self.renewals += 1
                else:
                    assert isinstance(op, Hold)
                    self.held.append(op.lock)
        return run.result

    def _call(self, op: Call) -> Message:
        assert self.script, f"an unexpected {op.rpc.path}"
        rpc, outcome = self.script.pop(0)
        assert op.rpc is rpc, f"{op.rpc.path} where {rpc.path} was expected"
        self.sent.append(op.request)
        if isinstance(op.request, broker_pb2.WaitApprovalRequest):
            self.clock.now += op.request.wait_seconds
            self.wall.now += op.request.wait_seconds
        if isinstance(outcome, BrokerError):
            raise outcome
        return outcome

    def done(self) -> None:
        assert not self.script, f"{len(self.script)} calls never made"


def connection(*, token: mayfly.WorkloadToken | None = None) -> mayfly.Connection:
    if token is not None:
        return mayfly.Connection("https://broker.test:8710", b"ca", b"", b"", token)
    return mayfly.Connection("https://broker.test:8710", b"ca", b"cert", b"key")


def broker_core(b: Broker, conn: mayfly.Connection | None = None) -> core.BrokerCore[Any]:
    return core.BrokerCore(
        conn or connection(),
        wrap=core.TaskMethods,
        new_lock=threading.Lock,
        clock=b.clock,
        wall=b.wall,
    )


def task_pb(state: types_pb2.TaskState = types_pb2.TASK_STATE_ACTIVE) -> types_pb2.Task:
    return types_pb2.Task(
        task_id="task1",
        agent_id="spiffe://example.org/agent/demo",
        intent="read",
        envelope=types_pb2.Envelope(audiences=[API], scopes=["read:t", "write:t"]),
        state=state,
        created_at=stamp(EPOCH),
        expires_at=stamp(EPOCH + 600),
    )


def issued(lease: str, life: float, now: float = EPOCH) -> broker_pb2.IssuedToken:
    return broker_pb2.IssuedToken(
        token=f"token-{lease}",
        lease_id=lease,
        audience=API,
        scopes=["read:t"],
        token_type="Bearer",
        expires_at=stamp(now + life),
    )


def approval_pb(state: types_pb2.ApprovalState, reason: str = "") -> types_pb2.Approval:
    return types_pb2.Approval(
        approval_id="appr1",
        task_id="task1",
        kind=types_pb2.LEASE_KIND_JWT,
        audience=API,
        scopes=["write:t"],
        state=state,
        policy_id="dev-write-production",
        decided_by="spiffe://example.org/operator/admin" if reason else "",
        reason=reason,
    )


def started(b: Broker, conn: mayfly.Connection | None = None) -> core.TaskCore:
    task = broker_core(b, conn).task("read", audiences=[API], scopes=["read:t"])
    b.script.insert(0, (w.START_TASK, task_pb()))
    b.run(task._core.start())
    started: core.TaskCore = task._core
    return started


def test_tokens_are_cached_by_audience_scopes_and_binding() -> None:
    b = Broker([])
    t = started(b)
    b.script += [(w.ISSUE_TOKEN, issued("l1", 300))]
    first = b.run(t.token(API, ["read:t", "write:t"]))
    # The same scopes in any order: the same token, no call.
    assert b.run(t.token(API, ["write:t", "read:t"])) is first
    bound = b.sent[-1]
    assert isinstance(bound, broker_pb2.IssueTokenRequest)
    assert bound.bind_to_client_cert  # the agent has a certificate
    # Another binding is another token: a bearer one, a DPoP-bound one.
    key = mayfly.DpopKey()
    b.script += [(w.ISSUE_TOKEN, issued("l2", 300)), (w.ISSUE_TOKEN, issued("l3", 300))]
    assert b.run(t.token(API, ["read:t", "write:t"], bind=False)).lease_id == "l2"
    assert b.run(t.token(API, ["read:t", "write:t"], dpop=key)).lease_id == "l3"
    dpop = b.sent[-1]
    assert isinstance(dpop, broker_pb2.IssueTokenRequest)
    assert (dpop.bind_to_client_cert, dpop.dpop_jwk) == (False, key.public_jwk_json)
    assert b.run(t.token(API, ["read:t", "write:t"], dpop=key)).lease_id == "l3"
    # One lock per key, of the client's kind.
    assert len({id(lock) for lock in b.held}) == 3
    # A forgotten token is asked for again.
    t.forget("l1")
    b.script += [(w.ISSUE_TOKEN, issued("l4", 300))]
    assert b.run(t.token(API, ["read:t", "write:t"])).lease_id == "l4"
    b.done()


def test_a_token_is_renewed_once_a_fifth_of_its_life_is_left() -> None:
    b = Broker([])
    t = started(b)
    b.script += [(w.ISSUE_TOKEN, issued("l1", 100))]
    token = b.run(t.token(API, ["read:t"]))
    b.wall.now = EPOCH + 79
    assert b.run(t.token(API, ["read:t"])) is token
    b.wall.now = EPOCH + 81
    b.script += [(w.ISSUE_TOKEN, issued("l2", 100, b.wall.now))]
    assert b.run(t.token(API, ["read:t"])).lease_id == "l2"
    # A long-lived token is renewed 30 s before its expiry at the latest.
    b.script += [(w.ISSUE_TOKEN, issued("l3", 3600, b.wall.now))]
    long = b.run(t.token(API, ["read:t"], bind=False))
    b.wall.now += 3600 - 31
    assert b.run(t.token(API, ["read:t"], bind=False)) is long
    b.wall.now += 2
    b.script += [(w.ISSUE_TOKEN, issued("l4", 3600, b.wall.now))]
    assert b.run(t.token(API, ["read:t"], bind=False)).lease_id == "l4"
    b.done()


def test_a_token_that_needs_approval_raises_or_waits_for_it() -> None:
    b = Broker([])
    t = started(b)
    pending = broker_pb2.IssuedToken(approval=approval_pb(types_pb2.APPROVAL_STATE_PENDING))
    b.script += [(w.ISSUE_TOKEN, pending)]
    with pytest.raises(mayfly.ApprovalRequired) as asked:
        b.run(t.token(API, ["write:t"]))
    assert asked.value.approval_id == "appr1"
    assert asked.value.approval.state is mayfly.ApprovalState.PENDING
    # Waiting: the request, the wait, the request again with the approval.
    b.script += [
        (w.ISSUE_TOKEN, pending),
        (w.WAIT_APPROVAL, approval_pb(types_pb2.APPROVAL_STATE_PENDING)),
        (w.WAIT_APPROVAL, approval_pb(types_pb2.APPROVAL_STATE_APPROVED)),
        (w.ISSUE_TOKEN, issued("l1", 300)),
    ]
    token = b.run(t.token(API, ["write:t"], wait_for_approval=300))
    assert token.lease_id == "l1"
    again = b.sent[-1]
    assert isinstance(again, broker_pb2.IssueTokenRequest)
    assert again.approval_id == "appr1"
    b.done()


def test_waiting_for_an_approval_polls_until_the_timeout() -> None:
    b = Broker([(w.WAIT_APPROVAL, approval_pb(types_pb2.APPROVAL_STATE_PENDING))] * 4)
    with pytest.raises(TimeoutError, match="still pending"):
        b.run(broker_core(b).wait_for_approval("appr1", timeout=130))
    waits = [r.wait_seconds for r in b.sent if isinstance(r, broker_pb2.WaitApprovalRequest)]
    assert waits == [60, 60, 10, 0]
    b.done()


def test_a_denied_approval_raises_with_the_operators_reason() -> None:
    denied = approval_pb(types_pb2.APPROVAL_STATE_DENIED, reason="not today")
    b = Broker([(w.WAIT_APPROVAL, denied)])
    with pytest.raises(mayfly.ApprovalDenied) as refused:
        b.run(broker_core(b).wait_for_approval("appr1"))
    assert (refused.value.approval_id, refused.value.reason) == ("appr1", "not today")
    assert refused.value.error == "approval_denied"
    b.done()


def refusal(name: str, code: grpc.StatusCode = grpc.StatusCode.UNAUTHENTICATED) -> BrokerError:
    return from_status(code, name, [("mayfly-error", name)])


def test_a_refused_workload_token_is_renewed_and_the_call_tried_once_more() -> None:
    source = mayfly.WorkloadToken.from_callable(lambda: "a.b.c")
    conn = connection(token=source)
    b = Broker([(w.GET_TASK, refusal("workload_token_used")), (w.GET_TASK, task_pb())])
    task = b.run(broker_core(b, conn).attach("task1"))
    assert task.task_id == "task1"
    assert b.renewals == 1
    # Refused again: the refusal comes through, after one renewal.
    b.script += [(w.GET_TASK, refusal("workload_token_expired"))] * 2
    with pytest.raises(Unauthenticated):
        b.run(broker_core(b, conn).attach("task1"))
    assert b.renewals == 2
    # Any other refusal, or an agent with a certificate: no renewal.
    b.script += [(w.GET_TASK, refusal("unauthenticated"))]
    with pytest.raises(Unauthenticated):
        b.run(broker_core(b, conn).attach("task1"))
    b.script += [(w.GET_TASK, refusal("workload_token_used"))]
    with pytest.raises(Unauthenticated):
        b.run(broker_core(b).attach("task1"))
    assert b.renewals == 2
    b.done()


def test_leaving_the_block_completes_the_task_and_never_hides_the_blocks_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    done = broker_pb2.CompleteTaskResponse(
        task=task_pb(types_pb2.TASK_STATE_COMPLETED), revoked_leases=["task1", "l1"]
    )
    b = Broker([])
    t = started(b)
    # Entering a started task starts nothing.
    b.run(t.enter())
    b.script += [(w.COMPLETE_TASK, done)]
    b.run(t.leave(None))
    assert t.info.state is mayfly.TaskState.COMPLETED
    # An ended task: completing it again does nothing.
    b.script += [(w.COMPLETE_TASK, refusal("task_not_active", grpc.StatusCode.FAILED_PRECONDITION))]
    assert b.run(t.complete()) == []
    # The broker is down: raised when the block went well...
    down = from_status(grpc.StatusCode.UNAVAILABLE, "down", [])
    b.script += [(w.COMPLETE_TASK, down)]
    with pytest.raises(mayfly.Unavailable):
        b.run(t.leave(None))
    # ...logged when the block raised, whose own exception goes on.
    b.script += [(w.COMPLETE_TASK, down)]
    with caplog.at_level(logging.ERROR, logger="mayfly"):
        b.run(t.leave(RuntimeError("tool crashed")))
    assert "could not complete task task1" in caplog.text
    b.done()


def test_a_task_not_started_says_so() -> None:
    b = Broker([(w.START_TASK, task_pb())])
    task = broker_core(b).task("read", audiences=[API])
    with pytest.raises(RuntimeError, match="not been started"):
        _ = task.info
    b.run(task._core.enter())
    assert task.task_id == "task1"
    with pytest.raises(RuntimeError, match="already started"):
        b.run(task._core.start())
    b.done()


def test_a_flow_may_handle_a_refusal_thrown_into_it() -> None:
    def flow() -> Flow[str]:
        try:
            yield Call(w.GET_TASK, broker_pb2.GetTaskRequest())
        except TaskEnded:
            return "ended"
        return "active"

    b = Broker([(w.GET_TASK, refusal("task_not_active"))])
    assert b.run(flow()) == "ended"
    unhandled = refusal("task_not_found")
    b.script += [(w.GET_TASK, unhandled)]
    with pytest.raises(mayfly.NotFound) as e:
        b.run(flow())
    assert e.value is unhandled


def test_states_are_str_enums() -> None:
    info = mayfly.TaskInfo.from_pb(task_pb(types_pb2.TASK_STATE_EXPIRED))
    assert info.state == "expired"
    assert f"{info.state}" == str(info.state) == "expired"
    assert isinstance(info.state, Enum)
    assert info.state is mayfly.TaskState.EXPIRED
    approval = mayfly.Approval.from_pb(approval_pb(types_pb2.APPROVAL_STATE_CONSUMED))
    assert approval.state is mayfly.ApprovalState.CONSUMED
    assert [s.value for s in mayfly.TaskState] == ["active", "completed", "revoked", "expired"]
    assert [s.value for s in mayfly.ApprovalState] == [
        "pending",
        "approved",
        "denied",
        "consumed",
        "expired",
    ]


def test_both_clients_have_each_method_once_blocking_and_once_a_coroutine() -> None:
    pairs: list[tuple[type[Any], type[Any]]] = [
        (mayfly.Task, mayfly.AsyncTask),
        (mayfly.Broker, mayfly.AsyncBroker),
    ]
    for sync, aio in pairs:
        names = [n for n in dir(sync) if not n.startswith("_") and callable(getattr(sync, n))]
        for name in names:
            ours: Callable[..., Any] = getattr(sync, name)
            theirs: Callable[..., Any] = getattr(aio, name)
            assert inspect.signature(ours).parameters == inspect.signature(theirs).parameters
            assert ours.__doc__ == theirs.__doc__ or name in (
                "auth",
                "call",
                "close",
                "ssl_context",
            )
            assert not inspect.iscoroutinefunction(ours)
    for name in ("start", "complete", "refresh", "token", "certificate", "delegate"):
        assert inspect.iscoroutinefunction(getattr(mayfly.AsyncTask, name)), name
    assert inspect.signature(mayfly.Task.token).return_annotation == "Token"


def test_no_import_cycles_among_the_modules() -> None:
    """Imports under TYPE_CHECKING count too: a cycle there is one a
    reader must untangle all the same."""
    modules = {
        ".".join(p.relative_to(SRC.parent).with_suffix("").parts): p for p in SRC.glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                deps |= {f"{base}.{a.name}" for a in node.names} | {base}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in modules and d not in (name, "mayfly.__init__")}
    graph = {n.removesuffix(".__init__"): d for n, d in graph.items()}

    def cycle_from(start: str, path: list[str]) -> list[str] | None:
        for dep in sorted(graph.get(path[-1], ())):
            if dep == start:
                return [*path, dep]
            if dep not in path:
                found = cycle_from(start, [*path, dep])
                if found:
                    return found
        return None

    assert len(graph) > 10
    for module in graph:
        assert cycle_from(module, [module]) is None, " -> ".join(cycle_from(module, [module]) or [])


def test_a_ttl_is_whole_positive_seconds() -> None:
    assert w.ttl_seconds(None) == 0
    assert w.ttl_seconds(dt.timedelta(minutes=2)) == 120
    assert w.ttl_seconds(0.2) == 1
    with pytest.raises(ValueError, match="positive"):
        w.ttl_seconds(-1)
