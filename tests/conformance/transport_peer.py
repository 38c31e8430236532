"""A transport peer in a process of its own, for tests that need real processes.

Run as ``python transport_peer.py ACTION --role {listen,connect} --remote D --port P ...``.
The backend is chosen exactly as the programs choose it (``load_backend`` from the environment),
so the same script serves any backend, including one in another domain. Results are one
JSON line on stdout; ``ready`` lines tell the test when the peer is connected.

Actions:
  hold    connect, send ``--message``, print ``ready``, then read until end of stream
          (the test kills it by pid to simulate peer death).
  source  send ``--bytes`` bytes of a seeded pattern, then close; report their SHA-256.
  sink    read until end of stream, optionally slowly, report SHA-256, size and peak RSS.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from collections.abc import Iterator
from typing import Any

from qrexec.backends.select import load_backend

BLOCK = 1 << 20


def pattern_blocks(total: int, seed: int) -> Iterator[bytes]:
    """1 MiB blocks of seeded random bytes, each rotated differently (shows reordering)."""
    block = random.Random(seed).randbytes(BLOCK)
    sent = 0
    index = 0
    while sent < total:
        shift = (index * 4099) % BLOCK
        chunk = block[shift:] + block[:shift]
        chunk = chunk[: total - sent]
        yield chunk
        sent += len(chunk)
        index += 1


def peak_rss_kib() -> int:
    """Peak RSS of this process image (``VmHWM``).

    Not ``getrusage``: Linux carries the pre-exec high-water mark of the forking parent
    (pytest, here) over into ``ru_maxrss``, which would measure the parent, not us.
    """
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise RuntimeError("no VmHWM in /proc/self/status")


class BlockingSide:
    def __init__(self, args: argparse.Namespace) -> None:
        backend = load_backend(None, os.environ)
        if args.role == "listen":
            self.stream = backend.listen(args.remote, args.port).accept(timeout=args.timeout)
        else:
            self.stream = backend.connect(args.remote, args.port, timeout=args.timeout)

    def send(self, data: bytes) -> None:
        self.stream.send(data)

    def recv(self, size: int) -> bytes:
        return self.stream.recv(size)

    def close(self) -> None:
        self.stream.close()


class AsyncioSide:
    """Drives the asyncio face with one private loop (run_until_complete per call)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import asyncio

        self.loop = asyncio.new_event_loop()
        backend = load_backend(None, os.environ)

        async def open_stream() -> Any:
            async with asyncio.timeout(args.timeout):
                if args.role == "listen":
                    listener = await backend.listen_async(args.remote, args.port)
                    return await listener.accept()
                return await backend.connect_async(args.remote, args.port)

        self.stream = self.loop.run_until_complete(open_stream())

    def send(self, data: bytes) -> None:
        self.loop.run_until_complete(self.stream.send(data))

    def recv(self, size: int) -> bytes:
        data: bytes = self.loop.run_until_complete(self.stream.recv(size))
        return data

    def close(self) -> None:
        self.loop.run_until_complete(self.stream.aclose())


def run(args: argparse.Namespace) -> dict[str, Any]:
    side = AsyncioSide(args) if args.face == "asyncio" else BlockingSide(args)
    if args.action == "hold":
        side.send(args.message.encode())
        print("ready", flush=True)
        while side.recv(65536):
            pass
        return {"eof": True}
    if args.action == "source":
        digest = hashlib.sha256()
        for chunk in pattern_blocks(args.bytes, args.seed):
            digest.update(chunk)
            side.send(chunk)
        side.close()
        return {"sha256": digest.hexdigest(), "bytes": args.bytes, "maxrss_kib": peak_rss_kib()}
    # sink
    digest = hashlib.sha256()
    received = 0
    next_pause = args.pause_every
    while data := side.recv(65536):
        digest.update(data)
        received += len(data)
        if args.pause_every and received >= next_pause:
            # A deliberately slow reader: the sender must be held back, not buffer for us.
            time.sleep(args.pause_ms / 1000)
            next_pause += args.pause_every
    side.close()
    return {"sha256": digest.hexdigest(), "bytes": received, "maxrss_kib": peak_rss_kib()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("hold", "source", "sink"))
    parser.add_argument("--role", choices=("listen", "connect"), required=True)
    parser.add_argument("--remote", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--face", choices=("blocking", "asyncio"), default="blocking")
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--message", default="hello")
    parser.add_argument("--bytes", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pause-every", type=int, default=0, help="bytes between pauses")
    parser.add_argument("--pause-ms", type=float, default=0.0)
    args = parser.parse_args(argv)
    result = run(args)
    result["asyncio_imported"] = "asyncio" in sys.modules
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
