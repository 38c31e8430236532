"""The C reference programs build once and are reused from the cache."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from qrexec.sim import cpeer

pytestmark = pytest.mark.cpeer


def test_every_program_is_built_and_runs(c_peer_bin: Path) -> None:
    for name in cpeer.PROGRAMS:
        path = cpeer.program(name, c_peer_bin)
        assert os.access(path, os.X_OK), path
    # qrexec-client with no arguments prints its usage and fails: proof that it loads
    # (its shared libraries are found through the rpath build.sh sets).
    result = subprocess.run(
        [str(cpeer.program("qrexec-client", c_peer_bin))], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "usage" in (result.stdout + result.stderr).lower()


def test_a_second_build_reuses_the_first(c_peer_bin: Path) -> None:
    before = (c_peer_bin / "qrexec-daemon").resolve().stat().st_mtime_ns
    assert cpeer.build() == c_peer_bin
    assert (c_peer_bin / "qrexec-daemon").resolve().stat().st_mtime_ns == before


def test_missing_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(cpeer.CPeerUnavailable, match="no C reference source"):
        cpeer.build(src=tmp_path / "nowhere", cache=tmp_path / "cache")


def test_unknown_program_name_is_refused(c_peer_bin: Path) -> None:
    with pytest.raises(ValueError, match="unknown C program"):
        cpeer.program("qrexec-frobnicate", c_peer_bin)
