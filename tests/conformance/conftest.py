"""Fixtures of the conformance suite: every test runs per backend pair and per face."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from conformance_support import FACES, PAIR_FACTORIES, BackendPair, Face


@pytest.fixture(params=sorted(PAIR_FACTORIES))
def pair(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[BackendPair]:
    with PAIR_FACTORIES[request.param](tmp_path) as backend_pair:
        yield backend_pair


@pytest.fixture(params=sorted(FACES))
def face(request: pytest.FixtureRequest) -> Iterator[Face]:
    chosen = FACES[request.param]()
    try:
        yield chosen
    finally:
        chosen.shutdown()
