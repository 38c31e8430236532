"""What is specific to the in-memory backend: lockstep mode, simulated domain death and
mixing faces across threads. Behaviour common to all backends is in tests/conformance."""

from __future__ import annotations

import asyncio
import threading

import pytest

from qrexec.backends.memory import MemoryHub
from qrexec.errors import TransportBroken, TransportClosed

pytestmark = pytest.mark.timeout(60)


def _pair(hub: MemoryHub) -> tuple[object, object]:
    a, b = hub.backend(1), hub.backend(2)
    listener = a.listen(2, 513)
    client = b.connect(1, 513, timeout=5)
    return listener.accept(timeout=5), client


def _both_send_first(
    hub: MemoryHub, size: int, wait: float
) -> tuple[threading.Thread, threading.Thread]:
    """The classic transport-buffer deadlock: each side sends before it receives."""
    server, client = _pair(hub)

    def talk(stream: object) -> None:
        try:
            stream.send(b"x" * size)  # type: ignore[attr-defined]
            stream.recv(size)  # type: ignore[attr-defined]
        except TransportBroken:  # the test ends a deadlock by killing both domains
            pass

    threads = (
        threading.Thread(target=talk, args=(server,), daemon=True),
        threading.Thread(target=talk, args=(client,), daemon=True),
    )
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(wait)
    return threads


def test_buffered_hub_lets_small_sends_pass_before_receives() -> None:
    threads = _both_send_first(MemoryHub(), 1000, wait=30)
    assert not any(t.is_alive() for t in threads)


def test_lockstep_hub_exposes_send_before_receive_deadlocks() -> None:
    hub = MemoryHub(lockstep=True)
    threads = _both_send_first(hub, 1000, wait=0.5)
    # A deadlock never resolves, however long we wait: both sides are still stuck in send.
    assert all(t.is_alive() for t in threads)
    hub.kill_domain(1)
    hub.kill_domain(2)
    for thread in threads:
        thread.join(5)
    assert not any(t.is_alive() for t in threads)


def test_lockstep_send_returns_only_once_the_peer_has_read_everything() -> None:
    server, client = _pair(MemoryHub(lockstep=True, buffer_size=4))
    done = threading.Event()

    def send() -> None:
        client.send(b"0123456789")  # type: ignore[attr-defined]
        done.set()

    threading.Thread(target=send, daemon=True).start()
    received = b""
    while len(received) < 10:
        assert not done.is_set()
        received += server.recv(3)  # type: ignore[attr-defined]
    assert done.wait(5)
    assert received == b"0123456789"


def test_killed_domain_loses_its_listeners_and_streams() -> None:
    hub = MemoryHub()
    a, b = hub.backend(1), hub.backend(2)
    server, client = _pair(hub)
    waiting = b.listen(1, 600)
    hub.kill_domain(2)
    with pytest.raises(TransportClosed):
        waiting.accept(timeout=1)
    with pytest.raises(TransportBroken):
        client.recv(1)  # type: ignore[attr-defined]
    assert server.recv(1) == b""  # type: ignore[attr-defined]
    # The domain can come back (a restarted VM) and connect again.
    listener = a.listen(2, 700)
    again = b.connect(1, 700, timeout=5)
    accepted = listener.accept(timeout=5)
    again.send(b"back")
    assert accepted.recv(4) == b"back"


def test_blocking_thread_talks_to_a_task_on_another_loop() -> None:
    hub = MemoryHub(buffer_size=1024)
    a, b = hub.backend(1), hub.backend(2)
    payload = bytes(range(256)) * 400

    def blocking_side() -> None:
        stream = b.connect(1, 513, timeout=10)
        stream.send(payload)
        assert stream.recv(3) == b"ack"
        stream.close()

    async def async_side() -> bytes:
        listener = await a.listen_async(2, 513)
        stream = await listener.accept()
        received = bytearray()
        while len(received) < len(payload):
            received += await stream.recv(65536)
        await stream.send(b"ack")
        assert await stream.recv(1) == b""
        await stream.aclose()
        return bytes(received)

    thread = threading.Thread(target=blocking_side, daemon=True)
    thread.start()
    assert asyncio.run(asyncio.wait_for(async_side(), 30)) == payload
    thread.join(10)
    assert not thread.is_alive()
