"""The socket backend's connect back-off: quick first retries, the same slow long waits."""

from __future__ import annotations

import itertools

from qrexec.backends.socket_setup import (
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    CONNECT_RETRY_SLOW_AFTER,
    CONNECT_RETRY_SLOW_MAX,
    next_retry_delay,
)


def schedule(total: float) -> list[float]:
    """The pauses a connect loop takes while no server appears for ``total`` seconds."""
    pauses: list[float] = []
    delay, waited = CONNECT_RETRY_FIRST, 0.0
    while waited < total:
        pauses.append(delay)
        waited += delay
        delay = next_retry_delay(delay, waited)
    return pauses


def test_a_server_appearing_after_100_microseconds_is_found_within_200() -> None:
    waited = 0.0
    for pause in schedule(1.0):
        waited += pause
        if waited >= 0.0001:
            break
    assert waited <= 0.0002


def test_pauses_double_up_to_the_caps_unchanged() -> None:
    pauses = schedule(10.0)
    assert pauses[0] == CONNECT_RETRY_FIRST
    assert pauses[1] == 2 * CONNECT_RETRY_FIRST
    assert CONNECT_RETRY_MAX == 0.05
    assert CONNECT_RETRY_SLOW_MAX == 1.0
    assert max(pauses) == CONNECT_RETRY_SLOW_MAX
    assert all(b <= max(2 * a, CONNECT_RETRY_MAX) for a, b in itertools.pairwise(pauses))


def test_long_waits_stay_cheap() -> None:
    """The short start adds a handful of wake-ups, not a busy loop: under 60 in 2 s."""
    assert len(schedule(CONNECT_RETRY_SLOW_AFTER)) < 60
    assert len(schedule(60.0)) < 120
