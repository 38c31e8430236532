"""The conformance scenarios split across two domains (e.g. dom0 and a Xen domU).

``test_conformance.py`` needs both domains in one process, which a real hypervisor does not
allow. Here each scenario has an ``a`` half and a ``b`` half, run by two copies of this
script, one per domain, that meet only through the transport under test::

    # in domain A (e.g. dom0, id 0):   python cross_domain.py --side a --peer-domain 5
    # in domain B (e.g. domU, id 5):   python cross_domain.py --side b --peer-domain 0

The backend is chosen from the environment exactly as the programs choose it
(``--transport`` / ``QREXEC_TRANSPORT`` / ``VCHAN_SOCKET_DIR``), ``--face`` picks the
blocking or asyncio face. Scenario ``i`` uses port ``--base-port + i`` on both sides, so the
two copies need no other synchronisation: servers wait for late clients and clients retry.
Each scenario prints ``CONFORMANCE <side> PASS|FAIL <name>``; the last line is
``CONFORMANCE <side> DONE passed=N failed=M`` and the exit status is 0 only if all passed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from conformance_support import (
    FACES,
    STEP_TIMEOUT,
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

from qrexec.backends.base import Backend
from qrexec.backends.select import load_backend
from qrexec.errors import TransportBroken, TransportClosed

PEER_SCRIPT = Path(__file__).with_name("transport_peer.py")
#: Lets the other side reach its blocking call before we act (never asserted on).
SETTLE = 0.5


@dataclass
class Side:
    backend: Backend
    face: Face
    peer: int
    port: int
    bulk: int
    max_buffered: int
    transport: str | None

    def serve(self) -> Stream:
        return self.face.listen(self.backend, self.peer, self.port).accept(timeout=STEP_TIMEOUT)

    def connect(self) -> Stream:
        return self.face.connect(self.backend, self.peer, self.port, timeout=STEP_TIMEOUT)


def expect(condition: bool, what: str) -> None:
    if not condition:
        raise AssertionError(what)


def expect_raises(kind: type[BaseException], action: Callable[[], object], what: str) -> None:
    try:
        action()
    except kind:
        return
    raise AssertionError(f"{what}: {kind.__name__} not raised")


MESSAGES = [pattern(1 + (i * 97) % 5000, seed=i) for i in range(300)]
SMALL = [bytes([i % 251]) * (1 + i % 17) for i in range(3000)]


def order_a(s: Side) -> None:
    stream = s.serve()
    sending = in_thread(lambda: [stream.send(m) for m in MESSAGES])
    expected = b"".join(MESSAGES)
    expect(recv_exactly(stream, len(expected)) == expected, "echoed bytes differ")
    sending.result(STEP_TIMEOUT)
    stream.close()


def order_b(s: Side) -> None:
    stream = s.connect()
    while data := stream.recv(4096):
        stream.send(data)
    stream.close()


def bulk_a(s: Side) -> None:
    stream = s.serve()
    sending = in_thread(lambda: send_pattern(stream, s.bulk, seed=1))
    expect(hash_exactly(stream, s.bulk) == pattern_sha256(s.bulk, 2), "b->a bulk hash differs")
    sending.result(STEP_TIMEOUT)
    expect(stream.recv(1) == b"", "no end of stream after bulk")
    stream.close()


def bulk_b(s: Side) -> None:
    stream = s.connect()
    sending = in_thread(lambda: send_pattern(stream, s.bulk, seed=2))
    expect(hash_exactly(stream, s.bulk) == pattern_sha256(s.bulk, 1), "a->b bulk hash differs")
    sending.result(STEP_TIMEOUT)
    stream.close()


def small_a(s: Side) -> None:
    stream = s.serve()
    expect(recv_until_eof(stream, 7) == b"".join(SMALL), "small messages differ")
    stream.close()


def small_b(s: Side) -> None:
    stream = s.connect()
    for message in SMALL:
        stream.send(message)
    stream.close()


def close_delivers_a(s: Side) -> None:
    stream = s.serve()
    stream.send(pattern(1 << 20, seed=3))
    stream.close()


def close_delivers_b(s: Side) -> None:
    stream = s.connect()
    expect(recv_until_eof(stream) == pattern(1 << 20, seed=3), "bytes lost at close")
    stream.close()


def blocked_recv_a(s: Side) -> None:
    stream = s.serve()
    time.sleep(SETTLE)
    stream.send(b"last words")
    stream.close()


def blocked_recv_b(s: Side) -> None:
    stream = s.connect()
    expect(recv_until_eof(stream) == b"last words", "blocked recv did not end cleanly")
    stream.close()


def blocked_send_a(s: Side) -> None:
    stream = s.serve()
    time.sleep(4 * SETTLE)
    stream.close()


def blocked_send_b(s: Side) -> None:
    stream = s.connect()
    chunk = pattern(65536, seed=5)

    def flood() -> None:
        for _ in range((256 << 20) // len(chunk)):
            stream.send(chunk)

    expect_raises(
        TransportBroken, lambda: in_thread(flood).result(STEP_TIMEOUT), "peer closed mid-send"
    )
    stream.close()


def backpressure_a(s: Side) -> None:
    stream = s.serve()
    time.sleep(6 * SETTLE)  # read nothing for a while: the sender must stall
    expect(hash_exactly(stream, s.bulk) == pattern_sha256(s.bulk, 7), "hash after stall differs")
    stream.close()


def backpressure_b(s: Side) -> None:
    stream = s.connect()
    accepted = [0]

    def send_all() -> None:
        for block in pattern_blocks(s.bulk, 7):
            for start in range(0, len(block), 65536):
                piece = block[start : start + 65536]
                stream.send(piece)
                accepted[0] += len(piece)

    sending = in_thread(send_all)
    stalled_at = wait_until_stalled(lambda: accepted[0])
    expect(
        stalled_at <= s.max_buffered + 65536,
        f"{stalled_at} bytes accepted while the peer read nothing",
    )
    sending.result(STEP_TIMEOUT)
    stream.close()


def late_client_a(s: Side) -> None:
    stream = s.serve()
    expect(recv_exactly(stream, 4) == b"late", "late client's bytes differ")
    stream.close()


def late_client_b(s: Side) -> None:
    time.sleep(2 * SETTLE)
    stream = s.connect()
    stream.send(b"late")
    expect(stream.recv(1) == b"", "no end of stream")
    stream.close()


def early_client_a(s: Side) -> None:
    time.sleep(2 * SETTLE)
    stream = s.serve()
    stream.send(b"early")
    expect(stream.recv(1) == b"", "no end of stream")
    stream.close()


def early_client_b(s: Side) -> None:
    stream = s.connect()
    expect(recv_exactly(stream, 5) == b"early", "early client's bytes differ")
    stream.close()


def own_close_a(s: Side) -> None:
    stream = s.serve()
    reading = in_thread(lambda: stream.recv(100))
    time.sleep(SETTLE)
    stream.close()
    stream.close()
    expect_raises(TransportClosed, lambda: reading.result(STEP_TIMEOUT), "blocked recv")
    expect_raises(TransportClosed, lambda: stream.send(b"x"), "send after close")
    expect_raises(TransportClosed, lambda: stream.recv(1), "recv after close")


def own_close_b(s: Side) -> None:
    stream = s.connect()
    expect(recv_until_eof(stream) == b"", "no end of stream after the peer closed")
    expect_raises(TransportBroken, lambda: stream.send(b"x"), "send to a closed peer")
    stream.close()


def timeouts_a(s: Side) -> None:
    listener = s.face.listen(s.backend, s.peer, s.port)
    expect_raises(TimeoutError, lambda: listener.accept(timeout=SETTLE), "accept")
    listener.close()


def timeouts_b(s: Side) -> None:
    expect_raises(
        TimeoutError,
        lambda: s.face.connect(s.backend, s.peer, s.port + 1000, timeout=SETTLE),
        "connect",
    )


def peer_death_a(s: Side) -> None:
    stream = s.serve()
    expect(recv_exactly(stream, 5) == b"hello", "greeting differs")
    expect(recv_until_eof(stream) == b"", "no end of stream after the peer died")
    expect_raises(TransportBroken, lambda: stream.send(b"x"), "send to a dead peer")
    stream.close()


def peer_death_b(s: Side) -> None:
    # A separate process plays domain b's side, so that it can really die (SIGKILL).
    command = [
        sys.executable,
        str(PEER_SCRIPT),
        "hold",
        "--role=connect",
        f"--remote={s.peer}",
        f"--port={s.port}",
        "--message=hello",
    ]
    env = dict(os.environ)
    if s.transport:
        env["QREXEC_TRANSPORT"] = s.transport
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        expect(process.stdout.readline().strip() == "ready", "peer process did not connect")
        time.sleep(SETTLE)
        os.kill(process.pid, 9)
        process.wait(STEP_TIMEOUT)
    finally:
        if process.poll() is None:
            os.kill(process.pid, 9)
            process.wait(STEP_TIMEOUT)


SCENARIOS: list[tuple[str, Callable[[Side], None], Callable[[Side], None]]] = [
    ("order", order_a, order_b),
    ("bulk-both-ways", bulk_a, bulk_b),
    ("small-messages", small_a, small_b),
    ("close-delivers-accepted-bytes", close_delivers_a, close_delivers_b),
    ("peer-close-ends-blocked-recv", blocked_recv_a, blocked_recv_b),
    ("peer-close-fails-blocked-send", blocked_send_a, blocked_send_b),
    ("backpressure", backpressure_a, backpressure_b),
    ("server-waits-for-late-client", late_client_a, late_client_b),
    ("client-before-server", early_client_a, early_client_b),
    ("own-close", own_close_a, own_close_b),
    ("timeouts", timeouts_a, timeouts_b),
    ("peer-death", peer_death_a, peer_death_b),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one side of the cross-domain conformance run")
    parser.add_argument("--side", choices=("a", "b"), required=True)
    parser.add_argument("--peer-domain", type=int, required=True)
    parser.add_argument("--face", choices=sorted(FACES), default="blocking")
    parser.add_argument("--transport", default=None, help="socket or vchan (default: env rule)")
    parser.add_argument("--base-port", type=int, default=1100)
    parser.add_argument("--bulk-mib", type=int, default=32, help="MiB each way in bulk tests")
    parser.add_argument("--max-buffered-mib", type=int, default=16)
    parser.add_argument("--only", action="append", help="run only these scenarios")
    args = parser.parse_args(argv)
    backend = load_backend(args.transport, os.environ)
    face = FACES[args.face]()
    passed = failed = 0
    try:
        for index, (name, half_a, half_b) in enumerate(SCENARIOS):
            if args.only and name not in args.only:
                continue
            side = Side(
                backend,
                face,
                args.peer_domain,
                args.base_port + index,
                args.bulk_mib << 20,
                args.max_buffered_mib << 20,
                args.transport,
            )
            try:
                (half_a if args.side == "a" else half_b)(side)
            except Exception:
                failed += 1
                reason = traceback.format_exc().strip().splitlines()[-1]
                print(f"CONFORMANCE {args.side} FAIL {name}: {reason}", flush=True)
                traceback.print_exc()
            else:
                passed += 1
                print(f"CONFORMANCE {args.side} PASS {name}", flush=True)
    finally:
        face.shutdown()
    print(f"CONFORMANCE {args.side} DONE passed={passed} failed={failed}", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
