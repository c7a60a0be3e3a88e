"""Reports of the requests Mayfly tokens came with, sent to the broker
(`mayfly.v1.Requests/ReportRequests`, as this service's SVID) in bounded
batches from a thread of their own, so that a task's trace
(`mayfly audit trace`) shows what each credential was used for here. A
request never waits for its report: one that cannot be queued or sent is
dropped and counted (`lost`).

The broker records a report only from a recipient of the token's
audience (a `[[resource_servers]]` entry listing this service).

    reports = RequestReports(feed)     # the verifier's FeedConfig
    app = TokenMiddleware(app, verifier, reports=reports)
"""

from __future__ import annotations

import logging
import queue
import threading

import grpc

from mayfly.config import Connection
from mayfly.v1 import requests_pb2
from mayfly.verify import FeedConfig

log = logging.getLogger("mayfly.reports")

#: Reports waiting to be sent.
QUEUE = 8192
#: Most reports in one batch (the broker's bound).
BATCH = 256


class RequestReports:
    """Sends request reports as the identity of `feed`. Thread-safe."""

    def __init__(self, feed: FeedConfig) -> None:
        self._queue: queue.Queue[requests_pb2.ServedRequest | None] = queue.Queue(QUEUE)
        self._lock = threading.Lock()
        self.reported = 0
        self.lost = 0
        creds = grpc.ssl_channel_credentials(
            root_certificates=feed.ca_pem,
            private_key=feed.key_pem,
            certificate_chain=feed.cert_pem,
        )
        target = Connection(feed.broker, b"", b"", b"").target
        self._channel = grpc.secure_channel(target, creds)
        svc = requests_pb2.DESCRIPTOR.services_by_name["Requests"]
        self._send = self._channel.unary_unary(
            f"/{svc.full_name}/{svc.methods_by_name['ReportRequests'].name}",
            request_serializer=requests_pb2.ReportRequestsRequest.SerializeToString,
            response_deserializer=requests_pb2.ReportRequestsResponse.FromString,
        )
        self._thread = threading.Thread(target=self._run, name="mayfly-reports", daemon=True)
        self._thread.start()

    def report(
        self,
        *,
        lease_id: str,
        method: str,
        route: str,
        status: int,
        latency_us: int,
        refused_because: str | None = None,
    ) -> None:
        """Queues one report; a full queue drops it (counted)."""
        served = requests_pb2.ServedRequest(
            lease_id=lease_id,
            method=method,
            route=route,
            accepted=refused_because is None,
            refused_because=refused_because or "",
            status=status,
            latency_us=max(latency_us, 0),
        )
        try:
            self._queue.put_nowait(served)
        except queue.Full:
            self._count(lost=1)

    def _count(self, *, reported: int = 0, lost: int = 0) -> None:
        with self._lock:
            self.reported += reported
            self.lost += lost

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < BATCH:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                self._send(requests_pb2.ReportRequestsRequest(requests=batch), timeout=5.0)
                self._count(reported=len(batch))
            except grpc.RpcError as e:
                self._count(lost=len(batch))
                code = e.code() if isinstance(e, grpc.Call) else None
                log.warning("%d request reports not recorded (%s)", len(batch), code)

    def close(self) -> None:
        """Sends what is queued, then stops."""
        self._queue.put(None)
        self._thread.join(timeout=10)
        self._channel.close()
