"""The vchan faces' waiting and flow control, over a fake ring pair (no hypervisor).

What is real here: our blocking stream (its lock, single event consumer and wakeups), our
asyncio stream (add_reader, bounded buffers, flush on close). What is fake: the rings
(see fake_ring.py). Payloads are hash-checked, and two threads send and receive at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fake_ring import ring_pair

from qrexec.backends.vchan import VchanStream
from qrexec.backends.vchan_async import AsyncVchanStream
from qrexec.errors import TransportBroken, TransportClosed

pytestmark = [pytest.mark.xen, pytest.mark.timeout(60)]
TOTAL = 3 << 20


def payload(seed: int) -> bytes:
    return random.Random(seed).randbytes(TOTAL)


def test_blocking_both_ways_at_once_from_two_threads_each() -> None:
    a_ring, b_ring = ring_pair(4096)
    a, b = VchanStream(a_ring), VchanStream(b_ring)  # type: ignore[arg-type]
    results: dict[str, str] = {}

    def sender(stream: VchanStream, data: bytes) -> None:
        for i in range(0, len(data), 10000):
            stream.send(data[i : i + 10000])

    def receiver(stream: VchanStream, name: str) -> None:
        digest = hashlib.sha256()
        got = 0
        while got < TOTAL:
            chunk = stream.recv(65536)
            assert chunk
            digest.update(chunk)
            got += len(chunk)
        results[name] = digest.hexdigest()

    threads = [
        threading.Thread(target=sender, args=(a, payload(1))),
        threading.Thread(target=sender, args=(b, payload(2))),
        threading.Thread(target=receiver, args=(a, "a")),
        threading.Thread(target=receiver, args=(b, "b")),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(50)
    assert results == {
        "a": hashlib.sha256(payload(2)).hexdigest(),
        "b": hashlib.sha256(payload(1)).hexdigest(),
    }
    a.close()
    assert b.recv(10) == b""
    with pytest.raises(TransportBroken):
        b.send(b"x")
    with pytest.raises(TransportClosed):
        a.recv(1)
    b.close()


def test_blocking_peer_death_ends_the_stream() -> None:
    a_ring, b_ring = ring_pair()
    a = VchanStream(a_ring)  # type: ignore[arg-type]
    b_ring.peer_dead = False
    a_ring.peer_dead = True  # as peer_alive would find after the domain died
    assert a.recv(10) == b""
    with pytest.raises(TransportBroken):
        a.send(b"x")
    a.close()
    b_ring.close()


def test_async_both_ways_and_flush_on_close() -> None:
    async def main() -> dict[str, Any]:
        a_ring, b_ring = ring_pair(4096)
        a = AsyncVchanStream(a_ring)  # type: ignore[arg-type]
        b = AsyncVchanStream(b_ring)  # type: ignore[arg-type]

        async def send_all(stream: AsyncVchanStream, data: bytes) -> None:
            for i in range(0, len(data), 30000):
                await stream.send(data[i : i + 30000])

        async def recv_all(stream: AsyncVchanStream, limit: int | None = None) -> str:
            digest = hashlib.sha256()
            got = 0
            while limit is None or got < limit:
                chunk = await stream.recv(65536)
                if not chunk:
                    break
                digest.update(chunk)
                got += len(chunk)
            return digest.hexdigest()

        async def a_side() -> str:
            receiving = asyncio.create_task(recv_all(a, TOTAL))
            await send_all(a, payload(3))
            got = await receiving
            await a.aclose()  # flushes what the ring has not taken yet
            return got

        async def b_side() -> str:
            await send_all(b, payload(4))
            return await recv_all(b)  # until a's close

        got_a, got_b = await asyncio.gather(a_side(), b_side())
        b.close()
        return {"a": got_a, "b": got_b}

    assert asyncio.run(main()) == {
        "a": hashlib.sha256(payload(4)).hexdigest(),
        "b": hashlib.sha256(payload(3)).hexdigest(),
    }


def test_async_send_waits_while_peer_does_not_read() -> None:
    async def main() -> int:
        a_ring, b_ring = ring_pair(4096)
        a = AsyncVchanStream(a_ring)  # type: ignore[arg-type]
        sending = asyncio.create_task(a.send(b"x" * (2 << 20)))
        await asyncio.sleep(0.2)
        assert not sending.done()  # bounded: the ring and our buffer are full
        b = AsyncVchanStream(b_ring)  # type: ignore[arg-type]
        got = 0
        while got < (2 << 20):
            got += len(await b.recv(65536))
        await sending
        a.close()
        b.close()
        return got

    assert asyncio.run(main()) == 2 << 20


def test_async_peer_close_keeps_unread_ring_data() -> None:
    """Bytes still in the ring when the peer closes are delivered before end of stream."""
    size = 64 * 1024 + 256 * 1024 + 64 * 1024  # ring + reader's buffer + writer's buffer

    async def main() -> bytes:
        a_ring, b_ring = ring_pair(65536)
        a = AsyncVchanStream(a_ring)  # type: ignore[arg-type]
        b = AsyncVchanStream(b_ring)  # type: ignore[arg-type]
        await a.send(payload(5)[:size])
        a.close()  # the last 64 KiB are still waiting in a's buffer: flushed after close
        await asyncio.sleep(0.1)
        received = bytearray()
        while chunk := await b.recv(4096):
            received += chunk
            await asyncio.sleep(0)  # let a's flush and close interleave with our reads
        b.close()
        return bytes(received)

    assert asyncio.run(main()) == payload(5)[:size]


def test_recv_into_both_faces_hash_exact_then_zero_at_eof() -> None:
    """recv_into reads the ring straight into the caller's buffer (blocking and asyncio)."""
    data = payload(5)
    a_ring, b_ring = ring_pair(4096)
    a, b = VchanStream(a_ring), VchanStream(b_ring)  # type: ignore[arg-type]

    def send_then_close() -> None:
        a.send(data)
        a.close()

    sender = threading.Thread(target=send_then_close)
    sender.start()
    buffer = bytearray(70000)
    received = bytearray()
    while count := b.recv_into(memoryview(buffer)[:65536]):
        received += buffer[:count]
    sender.join(30)
    b.close()
    assert hashlib.sha256(received).digest() == hashlib.sha256(data).digest()

    async def main() -> bytes:
        c_ring, d_ring = ring_pair(4096)
        c = AsyncVchanStream(c_ring)  # type: ignore[arg-type]
        d = AsyncVchanStream(d_ring)  # type: ignore[arg-type]

        async def send_all() -> None:
            await c.send(data)
            await c.aclose()

        sending = asyncio.create_task(send_all())
        got = bytearray()
        view = memoryview(buffer)
        while count := await d.recv_into(view[:50000]):
            got += view[:count]
        await sending
        d.close()
        with pytest.raises(TransportClosed):
            await d.recv_into(view)
        return bytes(got)

    assert asyncio.run(main()) == data
