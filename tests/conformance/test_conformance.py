"""The transport conformance suite: what every backend must do, on both faces.

Parametrised (see conftest.py) over every pair in ``PAIR_FACTORIES`` and over the blocking
and asyncio faces. Sleeps in here only make it likely that the other side is already
blocked when we act; no assertion depends on how long anything takes. ``WAIT`` bounds how
long a step may hang before the test fails instead of hanging.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conformance_support import (
    BackendPair,
    Face,
    Stream,
    hash_exactly,
    in_thread,
    pattern,
    pattern_sha256,
    recv_exactly,
    recv_until_eof,
    send_pattern,
    wait_until_stalled,
)
from transport_peer import pattern_blocks

from qrexec.errors import TransportBroken, TransportClosed

PORT = 513
WAIT = 60.0
SETTLE = 0.2
PEER_SCRIPT = Path(__file__).with_name("transport_peer.py")

pytestmark = pytest.mark.timeout(180)


def connected(pair: BackendPair, face: Face, port: int = PORT) -> tuple[Stream, Stream]:
    """Connect ``a`` (server) and ``b`` (client) on ``port``; return (a's end, b's end)."""
    listener = face.listen(pair.a, pair.b.own_domain, port)
    client = in_thread(lambda: face.connect(pair.b, pair.a.own_domain, port, timeout=WAIT))
    server_end = listener.accept(timeout=WAIT)
    return server_end, client.result(WAIT)


def test_streams_know_their_peer_and_port(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    assert (server_end.remote_domain, server_end.port) == (pair.b.own_domain, PORT)
    assert (client_end.remote_domain, client_end.port) == (pair.a.own_domain, PORT)
    server_end.close()
    client_end.close()


def test_bytes_arrive_in_order_both_ways(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)

    def echo() -> None:
        while data := client_end.recv(4096):
            client_end.send(data)
        client_end.close()

    echoing = in_thread(echo)
    messages = [pattern(1 + (i * 97) % 5000, seed=i) for i in range(300)]
    expected = b"".join(messages)
    sending = in_thread(lambda: [server_end.send(m) for m in messages])
    assert recv_exactly(server_end, len(expected)) == expected
    sending.result(WAIT)
    server_end.close()
    echoing.result(WAIT)


@pytest.mark.slow
def test_large_transfers_both_ways_at_once(pair: BackendPair, face: Face) -> None:
    big, small = 64 << 20, 8 << 20
    server_end, client_end = connected(pair, face)
    to_client = in_thread(lambda: send_pattern(server_end, big, seed=1))
    to_server = in_thread(lambda: send_pattern(client_end, small, seed=2))
    client_hash = in_thread(lambda: hash_exactly(client_end, big))
    assert hash_exactly(server_end, small) == pattern_sha256(small, 2)
    assert client_hash.result(WAIT) == pattern_sha256(big, 1)
    to_client.result(WAIT)
    to_server.result(WAIT)


def test_many_small_messages(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    messages = [bytes([i % 251]) * (1 + i % 17) for i in range(3000)]
    expected = b"".join(messages)

    def send_all() -> None:
        for message in messages:
            client_end.send(message)
        client_end.close()

    sending = in_thread(send_all)
    assert recv_until_eof(server_end, 7) == expected
    sending.result(WAIT)


def test_recv_returns_between_one_and_n_bytes(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    sending = in_thread(lambda: client_end.send(pattern(1000)))
    received = b""
    while len(received) < 1000:
        data = server_end.recv(10)
        assert 1 <= len(data) <= 10
        received += data
    sending.result(WAIT)
    assert received == pattern(1000)
    with pytest.raises(ValueError):
        server_end.recv(0)


def test_recv_into_fills_the_buffer_start_in_order_then_zero_at_eof(
    pair: BackendPair, face: Face
) -> None:
    server_end, client_end = connected(pair, face)
    payload = pattern(300_000, seed=9)
    sending = in_thread(lambda: (client_end.send(payload), client_end.close()))
    buffer = bytearray(b"\xaa" * 70_000)
    received = bytearray()
    while count := server_end.recv_into(memoryview(buffer)[:65536]):
        assert 1 <= count <= 65536
        received += buffer[:count]
    sending.result(WAIT)
    assert received == payload
    assert buffer[65536:] == b"\xaa" * (70_000 - 65536)  # nothing past the view
    with pytest.raises(ValueError):
        server_end.recv_into(bytearray())
    server_end.close()
    with pytest.raises(TransportClosed):
        server_end.recv_into(buffer)


def test_close_delivers_accepted_bytes_then_eof(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    reading = in_thread(lambda: recv_until_eof(client_end))
    payload = pattern(1 << 20, seed=3)
    server_end.send(payload)
    server_end.close()
    assert reading.result(WAIT) == payload


def test_peer_close_ends_a_blocked_recv(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    reading = in_thread(lambda: recv_until_eof(client_end))
    time.sleep(SETTLE)
    server_end.send(b"last words")
    server_end.close()
    assert reading.result(WAIT) == b"last words"


def test_own_close_fails_a_blocked_recv(pair: BackendPair, face: Face) -> None:
    server_end, _client_end = connected(pair, face)
    reading = in_thread(lambda: server_end.recv(100))
    time.sleep(SETTLE)
    server_end.close()
    with pytest.raises(TransportClosed):
        reading.result(WAIT)


def _start_flooding(stream: Stream) -> tuple[Callable[[], int], object]:
    accepted = [0]

    def flood() -> None:
        chunk = pattern(65536, seed=5)
        for _ in range((256 << 20) // len(chunk)):
            stream.send(chunk)
            accepted[0] += len(chunk)

    return (lambda: accepted[0]), in_thread(flood)


def test_peer_close_fails_a_blocked_send(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    progress, flooding = _start_flooding(client_end)
    wait_until_stalled(progress)
    server_end.close()
    with pytest.raises(TransportBroken):
        flooding.result(WAIT)  # type: ignore[attr-defined]


def test_own_close_fails_a_blocked_send(pair: BackendPair, face: Face) -> None:
    _server_end, client_end = connected(pair, face)
    progress, flooding = _start_flooding(client_end)
    wait_until_stalled(progress)
    client_end.close()
    with pytest.raises(TransportClosed):
        flooding.result(WAIT)  # type: ignore[attr-defined]


def test_send_to_a_closed_peer_is_broken(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    client_end.close()
    with pytest.raises(TransportBroken):
        server_end.send(b"anyone there?")
    assert server_end.recv(10) == b""


def test_use_after_own_close_and_idempotent_close(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    server_end.close()
    server_end.close()
    with pytest.raises(TransportClosed):
        server_end.send(b"x")
    with pytest.raises(TransportClosed):
        server_end.recv(1)
    assert client_end.recv(1) == b""
    aclose = getattr(client_end, "aclose", None)
    if aclose is not None:  # asyncio face: aclose is idempotent too, and closes
        aclose()
        aclose()
    client_end.close()
    with pytest.raises(TransportClosed):
        client_end.recv(1)


def test_backpressure_bounds_what_a_non_reader_buffers(pair: BackendPair, face: Face) -> None:
    server_end, client_end = connected(pair, face)
    total = 64 << 20
    accepted = [0]

    def send_all() -> None:
        for block in pattern_blocks(total, seed=7):
            for offset in range(0, len(block), 65536):
                client_end.send(block[offset : offset + 65536])
                accepted[0] += 65536

    sending = in_thread(send_all)
    stalled_at = wait_until_stalled(lambda: accepted[0])
    assert stalled_at <= pair.max_buffered + 65536
    assert not sending.done()
    assert hash_exactly(server_end, total) == pattern_sha256(total, 7)
    sending.result(WAIT)


def test_server_waits_for_a_late_client(pair: BackendPair, face: Face) -> None:
    listener = face.listen(pair.a, pair.b.own_domain, PORT)
    accepting = in_thread(lambda: listener.accept(timeout=WAIT))
    time.sleep(SETTLE)
    client_end = face.connect(pair.b, pair.a.own_domain, PORT, timeout=WAIT)
    server_end = accepting.result(WAIT)
    sending = in_thread(lambda: client_end.send(b"late"))
    assert recv_exactly(server_end, 4) == b"late"
    sending.result(WAIT)


def test_client_started_before_the_server(pair: BackendPair, face: Face) -> None:
    connecting = in_thread(lambda: face.connect(pair.b, pair.a.own_domain, PORT, timeout=WAIT))
    time.sleep(SETTLE)
    assert not connecting.done()
    server_end = face.listen(pair.a, pair.b.own_domain, PORT).accept(timeout=WAIT)
    client_end = connecting.result(WAIT)
    sending = in_thread(lambda: server_end.send(b"early"))
    assert recv_exactly(client_end, 5) == b"early"
    sending.result(WAIT)


def test_accept_and_connect_time_out(pair: BackendPair, face: Face) -> None:
    listener = face.listen(pair.a, pair.b.own_domain, PORT)
    with pytest.raises(TimeoutError):
        listener.accept(timeout=0.2)
    listener.close()
    with pytest.raises(TimeoutError):
        face.connect(pair.b, pair.a.own_domain, PORT + 1, timeout=0.2)


def test_closing_a_listener_fails_a_blocked_accept(pair: BackendPair, face: Face) -> None:
    listener = face.listen(pair.a, pair.b.own_domain, PORT)
    accepting = in_thread(lambda: listener.accept(timeout=WAIT))
    time.sleep(SETTLE)
    listener.close()
    listener.close()
    with pytest.raises(TransportClosed):
        accepting.result(WAIT)
    with pytest.raises(TimeoutError):
        face.connect(pair.b, pair.a.own_domain, PORT, timeout=0.2)


def test_a_server_takes_one_connection(pair: BackendPair, face: Face) -> None:
    listener = face.listen(pair.a, pair.b.own_domain, PORT)
    connecting = in_thread(lambda: face.connect(pair.b, pair.a.own_domain, PORT, timeout=WAIT))
    listener.accept(timeout=WAIT)
    connecting.result(WAIT)
    with pytest.raises(TimeoutError):
        face.connect(pair.b, pair.a.own_domain, PORT, timeout=0.3)
    with pytest.raises(TransportClosed):
        listener.accept(timeout=0.2)


def test_ports_are_independent(pair: BackendPair, face: Face) -> None:
    first = connected(pair, face, 513)
    second = connected(pair, face, 514)
    sending = [in_thread(lambda: first[1].send(b"one")), in_thread(lambda: second[1].send(b"two"))]
    assert recv_exactly(second[0], 3) == b"two"
    assert recv_exactly(first[0], 3) == b"one"
    for done in sending:
        done.result(WAIT)


def test_peer_death_gives_eof_then_broken(pair: BackendPair, face: Face) -> None:
    if pair.peer_env is not None:
        listener = face.listen(pair.a, pair.b.own_domain, PORT)
        command = [
            sys.executable,
            str(PEER_SCRIPT),
            "hold",
            "--role=connect",
            f"--remote={pair.a.own_domain}",
            f"--port={PORT}",
            "--message=hello",
        ]
        process = subprocess.Popen(
            command, env={**os.environ, **pair.peer_env}, stdout=subprocess.PIPE
        )
        try:
            server_end = listener.accept(timeout=WAIT)
            assert recv_exactly(server_end, 5) == b"hello"
            reading = in_thread(lambda: recv_until_eof(server_end))
            time.sleep(SETTLE)
            os.kill(process.pid, 9)
            process.wait(WAIT)
        finally:
            if process.poll() is None:
                os.kill(process.pid, 9)
                process.wait(WAIT)
            assert process.stdout is not None
            process.stdout.close()
    else:
        assert pair.kill_b is not None, "a pair must offer real or simulated peer death"
        server_end, client_end = connected(pair, face)
        sending = in_thread(lambda: client_end.send(b"hello"))
        assert recv_exactly(server_end, 5) == b"hello"
        sending.result(WAIT)
        reading = in_thread(lambda: recv_until_eof(server_end))
        time.sleep(SETTLE)
        pair.kill_b()
        with pytest.raises(TransportBroken):
            client_end.send(b"from beyond")
    assert reading.result(WAIT) == b""
    with pytest.raises(TransportBroken):
        server_end.send(b"are you there?")
