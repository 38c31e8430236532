"""Socket-backend throughput as a ratio to a plain blocking unix-socket copy.

Every mode moves the same bytes between two processes (sender and receiver, like two
domains), with the same 1 MiB sends and 64 KiB receives (``recv_into`` one preallocated
buffer on our faces, as the project's data paths do); the receiver times from the
connection to end of stream, and both report the CPU time they spent over the data phase
(sender plus receiver, per GiB, start-up and imports left out - less sensitive to a busy
machine than wall-clock throughput). Modes run
interleaved, several rounds, and the median per mode is compared with the median of the
plain copy measured in the same run, so machine noise affects baseline and backend alike:

  plain      socket.sendall / socket.recv on a bare AF_UNIX socket (the baseline)
  blocking   the socket backend's blocking face (qrexec-client, qrexec-client-vm)
  asyncio    the socket backend's asyncio face (agent, daemon)
  streams    asyncio streams on a bare socket, for reference (not used by the project)

Run: ``python bench/bench_transport.py [--mib 512] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODES = ("plain", "blocking", "asyncio", "streams")
SEND_SIZE = 1 << 20
RECV_SIZE = 65536
PORT = 513


def _plain_path(directory: Path) -> str:
    return str(directory / "plain.sock")


def _connect_plain(path: str) -> socket.socket:
    deadline = time.monotonic() + 30
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def receive(mode: str, directory: Path) -> tuple[int, float, float]:
    """Receive until end of stream; return (bytes, seconds, CPU seconds) since the connection.

    Our faces receive with ``recv_into`` into one preallocated buffer, as the project's data
    paths do; the plain copy keeps ``recv`` (the baseline is the same as in earlier runs).
    """
    total = 0
    buffer = bytearray(RECV_SIZE)
    if mode == "plain":
        server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        server.bind(_plain_path(directory))
        server.listen(1)
        print("listening", flush=True)
        conn, _ = server.accept()
        start, cpu = time.perf_counter(), time.process_time()
        while data := conn.recv(RECV_SIZE):
            total += len(data)
        return total, time.perf_counter() - start, time.process_time() - cpu
    if mode == "blocking":
        from qrexec.backends.socket import SocketBackend

        listener = SocketBackend(1, directory).listen(2, PORT)
        print("listening", flush=True)
        stream = listener.accept()
        start, cpu = time.perf_counter(), time.process_time()
        if not hasattr(stream, "recv_into"):  # an older tree, for "before" numbers
            while data := stream.recv(RECV_SIZE):
                total += len(data)
            return total, time.perf_counter() - start, time.process_time() - cpu
        while count := stream.recv_into(buffer):
            total += count
        return total, time.perf_counter() - start, time.process_time() - cpu
    import asyncio

    async def run_asyncio() -> tuple[int, float, float]:
        from qrexec.backends.socket import SocketBackend

        count = 0
        listener = await SocketBackend(1, directory).listen_async(2, PORT)
        print("listening", flush=True)
        stream = await listener.accept()
        start, cpu = time.perf_counter(), time.process_time()
        if not hasattr(stream, "recv_into"):  # an older tree, for "before" numbers
            while data := await stream.recv(RECV_SIZE):
                count += len(data)
            return count, time.perf_counter() - start, time.process_time() - cpu
        while received := await stream.recv_into(buffer):
            count += received
        return count, time.perf_counter() - start, time.process_time() - cpu

    async def run_streams() -> tuple[int, float, float]:
        done: asyncio.Future[tuple[int, float, float]] = asyncio.get_running_loop().create_future()

        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            count = 0
            start, cpu = time.perf_counter(), time.process_time()
            while data := await reader.read(RECV_SIZE):
                count += len(data)
            done.set_result((count, time.perf_counter() - start, time.process_time() - cpu))
            writer.close()

        server = await asyncio.start_unix_server(handle, _plain_path(directory))
        print("listening", flush=True)
        result = await done
        server.close()
        return result

    return asyncio.run(run_asyncio() if mode == "asyncio" else run_streams())


def send(mode: str, directory: Path, size: int) -> float:
    """Send ``size`` bytes; return the CPU seconds spent from the connection on."""
    block = os.urandom(SEND_SIZE)
    count = size // SEND_SIZE
    if mode == "plain":
        sock = _connect_plain(_plain_path(directory))
        cpu = time.process_time()
        for _ in range(count):
            sock.sendall(block)
        sock.close()
        return time.process_time() - cpu
    if mode == "blocking":
        from qrexec.backends.socket import SocketBackend

        stream = SocketBackend(2, directory).connect(1, PORT, timeout=30)
        cpu = time.process_time()
        for _ in range(count):
            stream.send(block)
        stream.close()
        return time.process_time() - cpu
    import asyncio

    async def run_asyncio() -> float:
        from qrexec.backends.socket import SocketBackend

        stream = await SocketBackend(2, directory).connect_async(1, PORT, timeout=30)
        cpu = time.process_time()
        for _ in range(count):
            await stream.send(block)
        await stream.aclose()
        return time.process_time() - cpu

    async def run_streams() -> float:
        _reader, writer = await asyncio.open_unix_connection(_plain_path(directory))
        cpu = time.process_time()
        for _ in range(count):
            writer.write(block)
            await writer.drain()
        writer.close()
        await writer.wait_closed()
        return time.process_time() - cpu

    return asyncio.run(run_asyncio() if mode == "asyncio" else run_streams())


def measure(mode: str, size: int) -> tuple[float, float]:
    """One transfer of ``size`` bytes in two processes; return (MB/s, CPU s per GiB)."""
    directory = Path(tempfile.mkdtemp(prefix="vcb", dir="/tmp"))
    script = os.path.abspath(__file__)
    receiver = subprocess.Popen(
        [sys.executable, script, "--child", "receive", mode, str(directory)],
        stdout=subprocess.PIPE,
        text=True,
    )
    sender: subprocess.Popen[str] | None = None
    try:
        assert receiver.stdout is not None
        if receiver.stdout.readline().strip() != "listening":
            raise RuntimeError(f"{mode} receiver did not start")
        sender = subprocess.Popen(
            [sys.executable, script, "--child", "send", mode, str(directory), str(size)],
            stdout=subprocess.PIPE,
            text=True,
        )
        out, _ = receiver.communicate(timeout=600)
        sender_out, _ = sender.communicate(timeout=60)
        if sender.returncode != 0 or receiver.returncode != 0:
            raise RuntimeError(f"{mode} transfer failed")
    finally:
        for process in (receiver, sender):
            if process is not None and process.poll() is None:
                os.kill(process.pid, 9)
                process.wait()
        shutil.rmtree(directory, ignore_errors=True)
    received, seconds, receiver_cpu = out.split()
    if int(received) != size:
        raise RuntimeError(f"{mode}: received {received} of {size} bytes")
    cpu = float(receiver_cpu) + float(sender_out.split()[-1])
    return size / float(seconds) / 1e6, cpu * (1 << 30) / size


def main() -> int:
    parser = argparse.ArgumentParser(description="socket-backend throughput vs a plain copy")
    parser.add_argument("--mib", type=int, default=512, help="MiB per transfer")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        role, mode, directory = args.child[:3]
        if role == "receive":
            received, seconds, cpu = receive(mode, Path(directory))
            print(received, seconds, cpu, flush=True)
        else:
            print(send(mode, Path(directory), int(args.child[3])), flush=True)
        return 0

    size = args.mib * SEND_SIZE
    rates: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpus: dict[str, list[float]] = {mode: [] for mode in MODES}
    for _ in range(args.rounds):
        for mode in MODES:
            rate, cpu = measure(mode, size)
            rates[mode].append(rate)
            cpus[mode].append(cpu)
    base_rate = statistics.median(rates["plain"])
    base_cpu = statistics.median(cpus["plain"])
    print(f"{args.mib} MiB per transfer, median of {args.rounds} rounds, two processes")
    print(f"{'mode':10} {'MB/s':>8} {'throughput/plain':>17} {'CPU s/GiB':>10} {'CPU/plain':>10}")
    for mode in MODES:
        rate = statistics.median(rates[mode])
        cpu = statistics.median(cpus[mode])
        print(f"{mode:10} {rate:8.0f} {rate / base_rate:17.2f} {cpu:10.2f} {cpu / base_cpu:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
