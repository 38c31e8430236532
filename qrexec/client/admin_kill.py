"""``qrexec-client -k``: ask qubesd to kill the destination once the call is over (spec §14).

One blocking admin call over the qubesd socket (``QREXEC_QUBESD_SOCKET``, default
``/run/qubesd.sock``): the request ``admin.vm.Kill dom0 name DEST`` (``keyword`` and the
name without ``@`` for a destination starting with ``@``) and a NUL, then the write side is
shut down; the answer is read to EOF (at most 65535 bytes): ``0`` NUL on success, ``2`` NUL
and an exception description on error. Blocking and free of asyncio, like the client.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping

QUBESD_SOCKET_ENV = "QREXEC_QUBESD_SOCKET"
DEFAULT_QUBESD_SOCKET = "/run/qubesd.sock"
MAX_ANSWER = 65535


def kill_domain(dest: str, env: Mapping[str, str], timeout: float = 60.0) -> str | None:
    """Send admin.vm.Kill for ``dest``; None on success, else what went wrong."""
    path = env.get(QUBESD_SOCKET_ENV) or DEFAULT_QUBESD_SOCKET
    kind = "keyword" if dest.startswith("@") else "name"
    request = f"admin.vm.Kill dom0 {kind} {dest.removeprefix('@')}".encode() + b"\0"
    answer = b""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            sock.connect(path)
            sock.sendall(request)
            sock.shutdown(socket.SHUT_WR)
            while len(answer) <= MAX_ANSWER and (chunk := sock.recv(65536)):
                answer += chunk
    except OSError as exc:
        return f"cannot reach qubesd at {path}: {exc}"
    code, _, rest = answer.partition(b"\0")
    if code == b"0":
        return None
    text = rest.replace(b"\0", b" ").decode("ascii", "replace").strip()
    return f"admin.vm.Kill {dest} failed: {text or 'malformed answer'}"
