"""Shared pieces of the real-Xen job's guest drivers: markers, payloads, raw exchanges.

Runs *inside* the emulated Xen guests (Debian's python3), never on the host. The host
decides pass/fail only from the marker lines printed here on the serial console:

``QXJ CHECK <name> PASS|FAIL <detail>``, ``QXJ INTEGRITY-FAIL <name> <detail>`` (a hash
mismatch: the host may re-run the boot once), ``QXJ METRIC <name> <value> <unit>``,
``QXJ DONE``.

A raw exchange moves a seeded pattern both ways at once over one stream - sending from a
second thread (blocking face) or task (asyncio face) - and each side checks the SHA-256 of
what it received against the pattern it expected, so a corruption anywhere on the way is
seen. The verdicts travel back to dom0 as one JSON line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import random
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from qrexec.backends.base import AsyncStream, BlockingStream

CONFIG_PATH = Path("/etc/qrexec-xen/job.json")
BLOCK = 1 << 20
CHUNK = 65536


class CheckFailed(Exception):
    """A check's expectation did not hold."""


class IntegrityFailed(CheckFailed):
    """Bytes arrived changed (hash mismatch): the host may re-run the boot once."""


def marker(kind: str, *fields: object) -> None:
    """Print one marker line (flushed) for the host to parse."""
    text = " ".join(str(f).replace("\n", " ") for f in fields)
    print(f"QXJ {kind} {text}".rstrip(), flush=True)
    sys.stdout.flush()


def setup_logging(config: dict[str, Any]) -> None:
    """Log to the console; the backends at DEBUG when the job asks for it."""
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stdout,
        format="%(relativeCreated)7.0fms %(name)s %(levelname)s: %(message)s",
    )
    if config.get("debug"):
        logging.getLogger("qrexec.backends").setLevel(logging.DEBUG)


def run_streaming(
    argv: list[str], env: dict[str, str], prefix: str, timeout: float
) -> tuple[int, list[str]]:
    """Run a program, copying its output lines to our console as they come.

    Returns (exit status, output lines); a program still running after ``timeout`` is
    killed (status -9), keeping what it printed.
    """
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            print(f"{prefix}{line}", end="", flush=True)
        return proc.wait(), lines
    finally:
        timer.cancel()


def load_config() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(CONFIG_PATH.read_text())
    return data


def pattern(total: int, seed: int) -> Iterator[bytes]:
    """``total`` bytes of a seeded pattern in 64 KiB chunks (each MiB rotated differently)."""
    block = random.Random(seed).randbytes(BLOCK)
    sent = 0
    index = 0
    while sent < total:
        shift = (index * 4099) % BLOCK
        rotated = block[shift:] + block[:shift]
        for start in range(0, BLOCK, CHUNK):
            piece = rotated[start : start + CHUNK][: total - sent]
            if not piece:
                break
            yield piece
            sent += len(piece)
        index += 1


def pattern_digest(total: int, seed: int) -> str:
    digest = hashlib.sha256()
    for piece in pattern(total, seed):
        digest.update(piece)
    return digest.hexdigest()


@dataclass
class Verdict:
    """What one side saw in an exchange."""

    ok: bool
    received: int
    digest_ok: bool
    seconds: float
    error: str = ""

    def to_line(self) -> bytes:
        return (json.dumps(asdict(self)) + "\n").encode()

    @classmethod
    def from_line(cls, raw: bytes) -> Verdict:
        data = json.loads(raw.decode())
        return cls(**data)


def exchange_blocking(stream: BlockingStream, total: int, seed_out: int, seed_in: int) -> Verdict:
    """Send our pattern from a thread while receiving the peer's; check the hash."""
    errors: list[str] = []

    def sender() -> None:
        try:
            for piece in pattern(total, seed_out):
                stream.send(piece)
        except Exception as exc:
            errors.append(f"send: {exc!r}")

    start = time.monotonic()
    thread = threading.Thread(target=sender, daemon=True)
    thread.start()
    digest = hashlib.sha256()
    received = 0
    while received < total:
        data = stream.recv(min(CHUNK, total - received))
        if not data:
            errors.append(f"early end of stream after {received} bytes")
            break
        digest.update(data)
        received += len(data)
    thread.join()
    elapsed = time.monotonic() - start
    digest_ok = received == total and digest.hexdigest() == pattern_digest(total, seed_in)
    return Verdict(
        ok=digest_ok and not errors,
        received=received,
        digest_ok=digest_ok,
        seconds=elapsed,
        error="; ".join(errors),
    )


async def exchange_async(stream: AsyncStream, total: int, seed_out: int, seed_in: int) -> Verdict:
    """The asyncio twin of :func:`exchange_blocking` (sender as a task)."""
    errors: list[str] = []

    async def sender() -> None:
        try:
            for piece in pattern(total, seed_out):
                await stream.send(piece)
        except Exception as exc:
            errors.append(f"send: {exc!r}")

    start = time.monotonic()
    task = asyncio.create_task(sender())
    digest = hashlib.sha256()
    received = 0
    while received < total:
        data = await stream.recv(min(CHUNK, total - received))
        if not data:
            errors.append(f"early end of stream after {received} bytes")
            break
        digest.update(data)
        received += len(data)
    await task
    elapsed = time.monotonic() - start
    digest_ok = received == total and digest.hexdigest() == pattern_digest(total, seed_in)
    return Verdict(
        ok=digest_ok and not errors,
        received=received,
        digest_ok=digest_ok,
        seconds=elapsed,
        error="; ".join(errors),
    )


def recv_line_blocking(stream: BlockingStream, limit: int = 65536) -> bytes:
    """Read one newline-terminated line (the peer's verdict)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        data = stream.recv(1)
        if not data:
            break
        buf += data
        if len(buf) > limit:
            break
    return bytes(buf)


async def recv_line_async(stream: AsyncStream, limit: int = 65536) -> bytes:
    buf = bytearray()
    while not buf.endswith(b"\n"):
        data = await stream.recv(1)
        if not data:
            break
        buf += data
        if len(buf) > limit:
            break
    return bytes(buf)


def ping_pong_blocking(stream: BlockingStream, rounds: int, *, initiator: bool) -> float:
    """Small-message round trips; return the mean round-trip time in seconds."""
    message = b"p" * 64
    start = time.monotonic()
    for _ in range(rounds):
        if initiator:
            stream.send(message)
            _recv_exact(stream, len(message))
        else:
            _recv_exact(stream, len(message))
            stream.send(message)
    return (time.monotonic() - start) / max(rounds, 1)


def _recv_exact(stream: BlockingStream, size: int) -> bytes:
    buf = bytearray()
    while len(buf) < size:
        data = stream.recv(size - len(buf))
        if not data:
            raise EOFError(f"end of stream after {len(buf)} of {size} bytes")
        buf += data
    return bytes(buf)
