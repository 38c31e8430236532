"""Socket services and their rpc-config options exit-on-client-eof / exit-on-service-eof,
and the agent's readiness notification."""

from __future__ import annotations

import contextlib
import socket
import threading
from pathlib import Path

import pytest

from qrexec.daemon.clients import bind_unix
from tests.integration.conftest import Domain, QrexecSystem

pytestmark = pytest.mark.timeout(60)


def lingering_service(path: Path, *, reply: bytes, close_after_reply: bool) -> threading.Event:
    """A unix-socket service that answers once; it stays open unless told to close.

    Returns an event the test sets to let a lingering service go.
    """
    server = bind_unix(str(path))
    release = threading.Event()

    def run() -> None:
        with server:
            conn, _ = server.accept()
            with conn, contextlib.suppress(OSError):
                conn.recv(4096)
                if reply:
                    conn.sendall(reply)
                if not close_after_reply:
                    release.wait(60)

    threading.Thread(target=run, daemon=True).start()
    return release


def test_exit_on_client_eof_ends_the_call_while_the_service_lingers(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    (vm1.root / "etc/qubes-rpc").mkdir(parents=True)
    vm1.write_file("etc/qubes/rpc-config/test.Linger", "exit-on-client-eof = true\n")
    release = lingering_service(
        vm1.root / "etc/qubes-rpc/test.Linger", reply=b"", close_after_reply=False
    )
    try:
        result = qrexec_system.client(
            "vm1", f"{qrexec_system.user}:QUBESRPC test.Linger src", input=b"x", timeout=30
        )
        assert result.returncode == 0
    finally:
        release.set()


def test_exit_on_service_eof_ends_the_call_while_stdin_stays_open(
    qrexec_system: QrexecSystem, vm1: Domain
) -> None:
    (vm1.root / "etc/qubes-rpc").mkdir(parents=True)
    vm1.write_file("etc/qubes/rpc-config/test.Once", "exit-on-service-eof = true\n")
    lingering_service(vm1.root / "etc/qubes-rpc/test.Once", reply=b"bye", close_after_reply=True)
    client = qrexec_system.popen_client("vm1", f"{qrexec_system.user}:QUBESRPC test.Once src")
    assert client.stdin is not None and client.stdout is not None
    client.stdin.write(b"hello")
    client.stdin.flush()
    # stdin stays open: only the service's EOF can end the call.
    assert client.stdout.read() == b"bye"
    assert client.wait(30) == 0
    client.stdin.close()


def test_agent_tells_systemd_it_is_ready(qrexec_system: QrexecSystem) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = qrexec_system.base / "notify"
    notify.bind(str(path))
    notify.settimeout(30)
    with notify:
        qrexec_system.start_vm("vm1", 1, agent_env={"NOTIFY_SOCKET": str(path)})
        assert notify.recv(100) == b"READY=1"
