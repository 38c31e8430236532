"""Connecting to a service that is a socket: a unix-socket service or a ``/dev/tcp`` symlink.

Used by the agent for calls from dom0 and by dom0's local paths (VM → dom0 calls,
``qrexec-client -d dom0``). Only connects; writing the service descriptor and relaying data
are :mod:`qrexec.services.relay`'s job.
"""

from __future__ import annotations

import asyncio
import socket

from qrexec.errors import ServiceError
from qrexec.services.lookup import ServiceKind, ServiceTarget
from qrexec.unix_address import unix_address


async def connect_service_socket(target: ServiceTarget) -> socket.socket:
    """Connect to a unix-socket or ``/dev/tcp`` service; ServiceError when it fails."""
    loop = asyncio.get_running_loop()
    if target.kind is ServiceKind.TCP:
        assert target.tcp is not None
        host, port = target.tcp
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        address: str | tuple[str, int] = (host, port)
    else:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        address = target.path
    sock.setblocking(False)
    try:
        if isinstance(address, str):
            # Deep domain roots give paths longer than a sockaddr_un holds.
            with unix_address(address) as reachable:
                await loop.sock_connect(sock, reachable)
        else:
            await loop.sock_connect(sock, address)
    except OSError as exc:
        sock.close()
        raise ServiceError(f"cannot connect to service {target.path}: {exc}") from None
    return sock
