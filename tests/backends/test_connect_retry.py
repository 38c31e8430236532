"""The socket backend's connect back-off: quick first retries, the same slow long waits."""

from __future__ import annotations

import asyncio
import itertools
import socket

import pytest

from qrexec.backends import socket_async
from qrexec.backends.socket_setup import (
    CONNECT_RETRY_FIRST,
    CONNECT_RETRY_MAX,
    CONNECT_RETRY_SLOW_AFTER,
    CONNECT_RETRY_SLOW_MAX,
    CONNECT_RETRY_YIELD_FOR,
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


def test_async_connect_retries_without_sleeping_at_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's shortest sleep is 1 ms: the first retries yield one pass instead."""
    ours, theirs = socket.socketpair()
    attempts: list[int] = []

    def connect_once(path: str) -> socket.socket | None:
        attempts.append(1)
        return ours if len(attempts) == 3 else None

    sleeps: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        await real_sleep(0)

    monkeypatch.setattr(socket_async, "connect_once", connect_once)
    monkeypatch.setattr(socket_async.asyncio, "sleep", sleep)
    stream = asyncio.run(socket_async.connect("/nowhere", 1, 513, timeout=5.0))
    try:
        assert len(attempts) == 3
        assert sleeps == [0, 0]
    finally:
        stream.close()
        theirs.close()


def test_async_connect_backs_off_after_the_yielding_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that stays away gets the sleeping back-off, not a spin."""
    clock = [0.0]
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)
        clock[0] += max(delay, 0.00005)

    async def run() -> None:
        loop = asyncio.get_running_loop()
        monkeypatch.setattr(loop, "time", lambda: clock[0])
        with pytest.raises(TimeoutError):
            await socket_async.connect("/nowhere", 1, 513, timeout=0.1)

    monkeypatch.setattr(socket_async, "connect_once", lambda path: None)
    monkeypatch.setattr(socket_async.asyncio, "sleep", sleep)
    asyncio.run(run())
    spins = [s for s in sleeps if s == 0]
    assert 0 < len(spins) <= CONNECT_RETRY_YIELD_FOR / 0.00005
    waits = [s for s in sleeps if s]
    assert waits[0] == CONNECT_RETRY_FIRST
    assert len(waits) < 20
