"""RFC 9449 DPoP. For agents: a key the agent keeps, to which the broker
binds a token (`cnf.jkt`), and the proof that goes with each request
(`DPoP:` header). A DPoP-bound token is useless without the key, and each
proof is good for one request (method, URL, time, the token's hash). For
services: `DpopRequest`, what a request presented, for `Verifier.verify`."""

from __future__ import annotations

import hashlib
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec

from mayfly._jose import b64url, jwk_thumbprint


class DpopKey:
    """A P-256 key pair for DPoP; the private half never leaves it."""

    def __init__(self, private_key: ec.EllipticCurvePrivateKey | None = None) -> None:
        self._key = private_key or ec.generate_private_key(ec.SECP256R1())
        numbers = self._key.public_key().public_numbers()
        self.jwk: dict[str, Any] = {
            "kty": "EC",
            "crv": "P-256",
            "x": b64url(numbers.x.to_bytes(32, "big")),
            "y": b64url(numbers.y.to_bytes(32, "big")),
        }
        self.jkt = jwk_thumbprint(self.jwk)

    def __repr__(self) -> str:
        return f"DpopKey(jkt={self.jkt!r})"

    @property
    def public_jwk_json(self) -> str:
        return json.dumps(self.jwk, separators=(",", ":"))

    def proof(self, method: str, url: str, access_token: str | None = None) -> str:
        """A fresh proof for one request to `url` (query and fragment are
        not part of it), with `ath` when it goes with `access_token`."""
        claims: dict[str, Any] = {
            "jti": secrets.token_urlsafe(16),
            "htm": method.upper(),
            "htu": url.split("?", 1)[0].split("#", 1)[0],
            "iat": int(time.time()),
        }
        if access_token is not None:
            claims["ath"] = b64url(hashlib.sha256(access_token.encode()).digest())
        return jwt.encode(
            claims, self._key, algorithm="ES256", headers={"typ": "dpop+jwt", "jwk": self.jwk}
        )


@dataclass(frozen=True)
class DpopRequest:
    """A request that came with the DPoP scheme, as a service saw it: the
    `DPoP` header's proof, the request's method (e.g. "GET") and its URL
    (query and fragment are ignored). `Verifier.verify(token, dpop=...)`
    checks the proof against them and the token."""

    proof: str = field(repr=False)
    method: str
    url: str
