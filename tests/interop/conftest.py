"""Fixtures for tests against Qubes' own C qrexec programs (built once per session)."""

from __future__ import annotations

from pathlib import Path

import pytest

from qrexec.sim import cpeer


@pytest.fixture(scope="session")
def c_peer_bin() -> Path:
    """The ``bin`` folder of the C reference programs; building them is required, never skipped.

    Tests that use it carry the ``cpeer`` marker, which the Python-only suite deselects and
    ``.ci/run`` runs; a machine that cannot build them fails those tests with the reason.
    """
    try:
        return cpeer.build()
    except cpeer.CPeerUnavailable as exc:
        pytest.fail(str(exc), pytrace=False)
