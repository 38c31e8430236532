"""The qubesd stand-in cannot be held by silent callers (issue 12: caps on every listener)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from qrexec.sim.qubesd import AdminServer


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[AdminServer, str]]:
    path = str(tmp_path / "qubesd.sock")
    api: Any = object()  # never reached: only refused requests are sent
    admin = AdminServer(path, api, max_idle=2, request_timeout=60)
    thread = threading.Thread(target=admin.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield admin, path
    admin.shutdown()
    thread.join()
    admin.server_close()


def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(20)
    sock.connect(path)
    return sock


def test_oldest_silent_caller_is_dropped_and_a_real_call_answered(
    server: tuple[AdminServer, str],
) -> None:
    admin, path = server
    silent = [connect(path), connect(path)]
    late = connect(path)
    assert silent[0].recv(1) == b""  # dropped for the newcomer, without an answer
    late.sendall(b"admin.vm.Unknown dom0 name vm1\0")
    late.shutdown(socket.SHUT_WR)
    answer = b""
    while chunk := late.recv(4096):
        answer += chunk
    assert answer.startswith(b"2\0ProtocolError\0")
    for sock in (*silent, late):
        sock.close()
    assert admin.request_queue_size >= 128


def test_silent_caller_times_out(tmp_path: Path) -> None:
    path = str(tmp_path / "qubesd.sock")
    api: Any = object()
    admin = AdminServer(path, api, request_timeout=0.2)
    thread = threading.Thread(target=admin.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    try:
        sock = connect(path)
        assert sock.recv(1) == b""
        sock.close()
    finally:
        admin.shutdown()
        thread.join()
        admin.server_close()
