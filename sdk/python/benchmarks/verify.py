"""Figures for the Python verifier, against a running broker:

1. throughput of `mayfly.Verifier.verify` next to a bare PyJWT decode of
   the same token with the same key (signature, iss, aud, exp), alternated
   in rounds in one process, reported as a ratio;
2. how long after a revoke returns the verifier refuses the token (the feed
   is up), over several revokes, against the 100 ms limit.

    python benchmarks/verify.py --profile .mayfly-dev --identity api-tickets \\
        --issuer https://localhost:8711
"""

from __future__ import annotations

import argparse
import ssl
import statistics
import threading
import time
from collections.abc import Callable

import jwt

import mayfly

AUDIENCE = "https://api.example.com"


def rate(call: Callable[[str], object], token: str, seconds: float) -> float:
    """Calls per second of `call(token)` over about `seconds`."""
    n = 0
    start = time.perf_counter()
    while time.perf_counter() - start < seconds:
        for _ in range(100):
            call(token)
        n += 100
    return n / (time.perf_counter() - start)


def revoke_delay(broker: mayfly.Broker, verifier: mayfly.Verifier) -> tuple[float, float]:
    """Milliseconds from a revoke's call, and from its return, until the
    verifier refuses the token (polled by another thread)."""
    task = broker.start_task("revoke", audiences=[AUDIENCE], scopes=["read:t"])
    token = task.token(AUDIENCE, ["read:t"], bind=False).value
    verifier.verify(token)
    seen = [0.0]

    def poll() -> None:
        while True:
            try:
                verifier.verify(token)
            except mayfly.VerifyError:
                seen[0] = time.perf_counter()
                return
            time.sleep(0.0002)

    poller = threading.Thread(target=poll)
    poller.start()
    start = time.perf_counter()
    task.complete()
    returned = time.perf_counter()
    poller.join(5)
    if not seen[0]:
        raise SystemExit("the revoked token was still accepted after 5 s")
    return (seen[0] - start) * 1000, max(0.0, seen[0] - returned) * 1000


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--profile", required=True)
    p.add_argument("--identity", required=True, help="a workload that may watch the feed")
    p.add_argument("--issuer", required=True)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--revokes", type=int, default=20)
    args = p.parse_args()
    feed = mayfly.FeedConfig.from_profile(args.profile, args.identity)
    with (
        mayfly.Verifier(
            issuer=args.issuer, audience=AUDIENCE, ca=feed.ca_pem, feed=feed
        ) as verifier,
        mayfly.connect(profile=args.profile) as broker,
    ):
        if not verifier.wait_for_feed(10):
            raise SystemExit("the revocation feed did not sync")
        task = broker.start_task("bench", audiences=[AUDIENCE], scopes=["read:t"])
        token = task.token(AUDIENCE, ["read:t"], bind=False).value
        # The baseline gets the same key with PyJWT's own JWKS client.
        tls = ssl.create_default_context(cadata=feed.ca_pem.decode())
        jwks = jwt.PyJWKClient(f"{args.issuer}/.well-known/jwks.json", ssl_context=tls)
        key = jwks.get_signing_key_from_jwt(token).key

        def bare(t: str) -> object:
            return jwt.decode(t, key, algorithms=["ES256"], audience=AUDIENCE, issuer=args.issuer)

        def full(t: str) -> object:
            return verifier.verify(t)

        ours, theirs = [], []
        for _ in range(args.rounds):
            theirs.append(rate(bare, token, args.seconds))
            ours.append(rate(full, token, args.seconds))
        ratios = [o / t for o, t in zip(ours, theirs, strict=True)]
        print(
            f"verify: mayfly {statistics.median(ours):.0f}/s, bare PyJWT "
            f"{statistics.median(theirs):.0f}/s; ratio median {statistics.median(ratios):.3f} "
            f"(rounds {', '.join(f'{r:.3f}' for r in ratios)})"
        )
        task.complete()

        delays = [revoke_delay(broker, verifier) for _ in range(args.revokes)]
        from_call = sorted(d[0] for d in delays)
        from_return = sorted(d[1] for d in delays)
        p95 = from_call[int(len(from_call) * 0.95) - 1]
        print(
            "revoke to refusal: from the revoke call median "
            f"{statistics.median(from_call):.1f} ms, p95 {p95:.1f} ms, max "
            f"{from_call[-1]:.1f} ms (limit 100 ms: max/limit {from_call[-1] / 100:.2f}); "
            f"after the call returned median {statistics.median(from_return):.1f} ms"
        )


if __name__ == "__main__":
    main()
