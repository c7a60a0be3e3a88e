"""The generated messages in src/mayfly/v1 are what the repository's
proto/ gives: regenerated here with grpc_tools.protoc and compared, so a
proto change not carried into the SDK fails."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.conftest import REPO

GENERATED = REPO / "sdk" / "python" / "src" / "mayfly" / "v1"


def test_generated_stubs_match_the_protos(tmp_path: Path) -> None:
    protos = sorted((REPO / "proto" / "mayfly" / "v1").glob("*.proto"))
    assert protos, "no protos found"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            f"-I{REPO / 'proto'}",
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            *map(str, protos),
        ],
        check=True,
    )
    fresh = {p.name: p.read_bytes() for p in (tmp_path / "mayfly" / "v1").iterdir()}
    held = {p.name: p.read_bytes() for p in GENERATED.glob("*_pb2.py*")}
    assert sorted(fresh) == sorted(held), "regenerate: see sdk/python/README.md"
    stale = [name for name in fresh if fresh[name] != held[name]]
    assert not stale, f"{stale} differ from proto/; regenerate: see sdk/python/README.md"
