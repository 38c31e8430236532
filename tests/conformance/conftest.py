"""Fixtures of the conformance suite: every test runs per backend pair and per face."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_support import FACES, PAIR_FACTORIES, BackendPair, Face


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A private directory with a short path (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="vc", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(params=sorted(PAIR_FACTORIES))
def pair(request: pytest.FixtureRequest, short_dir: Path) -> Iterator[BackendPair]:
    with PAIR_FACTORIES[request.param](short_dir) as backend_pair:
        yield backend_pair


@pytest.fixture(params=sorted(FACES))
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    chosen = FACES[request.param]()
    try:
        yield chosen
    finally:
        chosen.shutdown()
