"""Where the broker is and which identity to present: arguments first, then
`MAYFLY_BROKER`, `MAYFLY_CA`, `MAYFLY_CERT`, `MAYFLY_KEY`, then a profile
directory written by `mayfly dev init` (`profile=`, `MAYFLY_PROFILE`, or
`./.mayfly-dev`), as the `mayfly` CLI finds them.

An agent without a certificate presents a workload token instead
(`token=`, `token_file=` or `MAYFLY_TOKEN_FILE`; see
`mayfly.workload_token`); the broker and its CA come from the same places."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

from mayfly.errors import ConfigError
from mayfly.workload_token import WorkloadToken

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_PROFILE = ".mayfly-dev"


@dataclass(frozen=True)
class Connection:
    """A resolved broker connection: the gRPC target, the CA bundle that
    issued the broker's certificate, and the agent's identity: its SVID
    (PEM bytes), or else its workload token's source."""

    broker: str
    ca_pem: bytes = field(repr=False)
    cert_pem: bytes = field(repr=False)
    key_pem: bytes = field(repr=False)
    workload_token: WorkloadToken | None = None

    @property
    def has_certificate(self) -> bool:
        """Whether the agent presents a client certificate (else a token)."""
        return bool(self.cert_pem)

    @property
    def target(self) -> str:
        """`host:port` for grpc."""
        url = urlsplit(self.broker if "://" in self.broker else f"https://{self.broker}")
        if url.scheme != "https":
            raise ConfigError(f"broker URL {self.broker!r} must be https:// (the broker is mTLS)")
        if not url.hostname or not url.port:
            raise ConfigError(f"broker URL {self.broker!r} needs a host and a port")
        return f"{url.hostname}:{url.port}"


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ConfigError(f"cannot read {what} {path}: {e.strerror}") from e


def _profile(pdir: Path, *fields: str) -> list[str]:
    """The named fields of the profile in `pdir` (`mayfly dev init`)."""
    text = _read(pdir / "profile.toml", "profile").decode("utf-8", "replace")
    try:
        data = tomllib.loads(text)
        return [str(data[f]) for f in fields]
    except (tomllib.TOMLDecodeError, KeyError) as e:
        raise ConfigError(f"invalid profile {pdir / 'profile.toml'}: {e}") from e


def resolve(
    broker: str | None = None,
    *,
    ca: str | os.PathLike[str] | None = None,
    cert: str | os.PathLike[str] | None = None,
    key: str | os.PathLike[str] | None = None,
    profile: str | os.PathLike[str] | None = None,
    identity: str | None = None,
    token: WorkloadToken | None = None,
    token_file: str | os.PathLike[str] | None = None,
) -> Connection:
    """The connection the arguments, the environment and the profile give."""
    env = os.environ
    broker = broker or env.get("MAYFLY_BROKER")
    ca_p = ca or env.get("MAYFLY_CA")
    cert_p = cert or env.get("MAYFLY_CERT")
    key_p = key or env.get("MAYFLY_KEY")
    if token is not None or token_file is not None or env.get("MAYFLY_TOKEN_FILE"):
        if token is not None and token_file is not None:
            raise ConfigError("token and token_file: give one source of workload tokens")
        if cert or key:
            raise ConfigError(
                "a client certificate and a workload token: an agent proves itself with one"
            )
        source = token or WorkloadToken.from_file(token_file or env["MAYFLY_TOKEN_FILE"])
        return _with_token(broker, ca_p, profile or env.get("MAYFLY_PROFILE"), source)
    if broker and ca_p and cert_p and key_p:
        return Connection(
            broker,
            _read(Path(ca_p), "CA bundle"),
            _read(Path(cert_p), "certificate"),
            _read(Path(key_p), "private key"),
        )
    prof = profile or env.get("MAYFLY_PROFILE")
    if prof is None:
        if not (Path(DEFAULT_PROFILE) / "profile.toml").exists():
            raise ConfigError(
                "no broker connection: pass broker, ca, cert and key (or set MAYFLY_BROKER, "
                "MAYFLY_CA, MAYFLY_CERT, MAYFLY_KEY), or profile= a directory from "
                "`mayfly dev init` (default ./.mayfly-dev)"
            )
        prof = DEFAULT_PROFILE
    pdir = Path(prof)
    p_broker, p_ca, p_agent = _profile(pdir, "broker", "ca", "agent")
    name = identity or env.get("MAYFLY_IDENTITY") or p_agent
    if "/" in name or name.startswith("."):
        raise ConfigError(f"identity {name!r} must be a directory name under identities/")
    idir = pdir / "identities" / name
    if not idir.is_dir():
        raise ConfigError(
            f"identity {name!r} not found in {pdir / 'identities'}; make one with "
            f"`mayfly dev identity --dir {pdir} spiffe://…`"
        )
    return Connection(
        broker or p_broker,
        _read(Path(ca_p) if ca_p else pdir / p_ca, "CA bundle"),
        _read(Path(cert_p) if cert_p else idir / "svid.pem", "certificate"),
        _read(Path(key_p) if key_p else idir / "svid.key", "private key"),
    )


def _with_token(
    broker: str | None,
    ca: str | os.PathLike[str] | None,
    profile: str | os.PathLike[str] | None,
    token: WorkloadToken,
) -> Connection:
    """A connection that proves the agent by `token`; the broker and its CA
    from the arguments, else from the profile."""
    if broker is None or ca is None:
        prof = Path(profile or DEFAULT_PROFILE)
        if not (prof / "profile.toml").exists():
            raise ConfigError(
                "a workload token needs the broker and its CA: pass broker and ca (or set "
                "MAYFLY_BROKER and MAYFLY_CA), or profile= a directory from `mayfly dev init`"
            )
        p_broker, p_ca = _profile(prof, "broker", "ca")
        broker = broker or p_broker
        ca = ca or prof / p_ca
    return Connection(broker, _read(Path(ca), "CA bundle"), b"", b"", token)
