"""Shared pytest configuration.

Hypothesis runs without its per-example deadline: the suite runs on shared 2-core machines
where a loaded moment makes any example slow, and a timing limit in a unit test is a flake,
not a check (performance is measured in bench/). Health checks stay on.
"""

from collections.abc import Iterator

import pytest
from hypothesis import settings

settings.register_profile("qrexec", deadline=None)
settings.load_profile("qrexec")


@pytest.fixture(autouse=True)
def _fresh_splice_probe() -> Iterator[None]:
    """Tests take ``os.splice`` away or make it fail: the process-wide answer to "does
    splice work here" (qrexec.splice_support) is asked anew in each test."""
    from qrexec import splice_support

    splice_support.forget()
    yield
    splice_support.forget()
