"""Shared pytest configuration.

Hypothesis runs without its per-example deadline: the suite runs on shared 2-core machines
where a loaded moment makes any example slow, and a timing limit in a unit test is a flake,
not a check (performance is measured in bench/). Health checks stay on.
"""

from hypothesis import settings

settings.register_profile("qrexec", deadline=None)
settings.load_profile("qrexec")
