"""qrexec.listening: the idle cap (oldest dropped, talkers kept) and the EMFILE pause."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from qrexec import listening
from qrexec.listening import GuardedServer, listen_backlog, request_complete


def test_backlog_is_the_kernels_maximum() -> None:
    with open(listening.SOMAXCONN_PATH, encoding="ascii") as f:
        assert listen_backlog() == int(f.read())


def test_idle_cap_drops_the_oldest_silent_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(listening, "MIN_IDLE_AGE", 0.0)
    path = str(tmp_path / "s.sock")

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        request_complete()
        writer.write(b"ok " + line)
        await writer.drain()
        await reader.read()  # hold the connection until the peer closes

    async def run() -> list[bytes]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(listen_backlog())
        server = GuardedServer(sock, handler, what="test", max_idle=2)
        server.start()
        talker_r, talker_w = await asyncio.open_unix_connection(path)
        talker_w.write(b"hello\n")
        assert await talker_r.readline() == b"ok hello\n"
        silent = [await asyncio.open_unix_connection(path) for _ in range(3)]
        # The first silent one makes room for the third; the talker is never counted.
        first = await asyncio.wait_for(silent[0][0].read(), 10)
        results = [first]
        for reader, writer in silent[1:]:
            writer.write(b"late\n")
            results.append(await asyncio.wait_for(reader.readline(), 10))
        assert server.idle_dropped == 1
        for _, writer in [*silent, (talker_r, talker_w)]:
            writer.close()
        await server.aclose()
        return results

    assert asyncio.run(run()) == [b"", b"ok late\n", b"ok late\n"]


CHILD = textwrap.dedent(
    """
    import asyncio, json, logging, resource, socket, sys
    from qrexec.listening import GuardedServer, listen_backlog

    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger().addHandler(Keep())
    resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    async def handler(reader, writer):
        await reader.read()

    async def main():
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(sys.argv[1])
        sock.listen(listen_backlog())
        server = GuardedServer(sock, handler, what="child", max_idle=10000)
        server.start()
        print("ready", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        await asyncio.sleep(1.0)
        print(json.dumps({"pauses": server.accept_pauses, "log": records}), flush=True)
        await server.aclose()

    asyncio.run(main())
    """
)


def test_descriptor_exhaustion_pauses_with_one_warning(tmp_path: Path) -> None:
    path = str(tmp_path / "s.sock")
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, path],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert child.stdin is not None and child.stdout is not None
    clients: list[socket.socket] = []
    try:
        assert child.stdout.readline() == "ready\n"
        for _ in range(200):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(path)
            clients.append(sock)
        child.stdin.write("go\n")
        child.stdin.flush()
        report = json.loads(child.stdout.readline())
    finally:
        for sock in clients:
            sock.close()
        child.stdin.close()
        child.wait(30)
    assert child.returncode == 0
    assert report["pauses"] >= 1
    exhausted = [line for line in report["log"] if "cannot accept" in line]
    assert len(exhausted) == 1, report["log"]
    assert len(report["log"]) <= 3, report["log"]
