"""SERVICE_CONNECT on the daemon's client socket (spec §15.3, §5 item 4), byte level.

vm1 is a scripted agent behind our daemon; a silent policy keeps its requests pending
(the policy decision "still running"). A raw client on ``qrexec.1`` then sends
SERVICE_CONNECT frames of any shape; we check what reaches the agent (verbatim, or
nothing), what the client gets back, and that the request's own outcome no longer
refuses a claimed request.
"""

from __future__ import annotations

import socket
import struct
import threading

import pytest

from qrexec.protocol.constants import MsgType
from qrexec.protocol.messages import ConnectionTerminated, RawFrame, ServiceConnect, ServiceRefused
from tests.integration.fake_agent import RawControl
from tests.integration.test_vmcall_hostile import (
    SilentPolicy,
    World,
    ident,
    silent_policy,
    trigger4,
    world,
)
from tests.integration.vmcall_support import vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["silent_policy", "vmcalls", "world"]

HELLO3 = struct.pack("<III", MsgType.HELLO, 4, 3)


def connect_frame(domain: int, port: int, raw_ident: bytes) -> bytes:
    payload = struct.pack("<II", domain, port) + raw_ident
    return struct.pack("<II", MsgType.SERVICE_CONNECT, len(payload)) + payload


class RawClient:
    """A client of the daemon socket speaking raw bytes."""

    def __init__(self, world: World) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(str(world.system.daemon_socket(1)))
        assert self._recv(12) == HELLO3
        self.sock.sendall(HELLO3)

    def _recv(self, size: int) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                break
            data += chunk
        return data

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def rest(self) -> bytes:
        """Everything until the daemon closes this client."""
        return self._recv(1 << 16)

    def close(self) -> None:
        self.sock.close()


def pending(world: World, policy: SilentPolicy, *names: bytes) -> RawControl:
    """vm1 with requests SOCKET<n> for each name waiting on the silent policy."""
    path = world.vmcalls.base / "silent-policy.sock"
    control = world.start_vm1({"QREXEC_POLICY_SOCKET": str(path)})
    for number, name in enumerate(names, 5):
        control.send_raw(trigger4(name, request_id=b"SOCKET%d" % number))
    while policy.count() < len(names):
        threading.Event().wait(0.05)
    return control


def test_short_ident_matches_and_is_forwarded_verbatim(
    world: World, silent_policy: SilentPolicy
) -> None:
    control = pending(world, silent_policy, b"test.Env")
    client = RawClient(world)
    client.send(connect_frame(2, 600, b"SOCKET5\0"))
    forwarded = control.read(20)
    assert forwarded == RawFrame(MsgType.SERVICE_CONNECT, struct.pack("<II", 2, 600) + b"SOCKET5\0")
    # The request is answered: the policy's late failure sends no REFUSED.
    silent_policy.release()
    with pytest.raises(TimeoutError):
        control.read(3)
    # No reply for a non-zero port; the client is closed at CONNECTION_TERMINATED.
    control.send(ConnectionTerminated(2, 600))
    assert client.rest() == b""


def test_port_zero_gets_a_port_and_the_padded_ident_goes_as_sent(
    world: World, silent_policy: SilentPolicy
) -> None:
    control = pending(world, silent_policy, b"test.Env")
    client = RawClient(world)
    client.send(connect_frame(0, 0, ident(b"SOCKET5")))
    assert client._recv(16) == struct.pack("<IIII", MsgType.SERVICE_CONNECT, 8, 1, 513)
    assert control.read(20) == ServiceConnect(0, 513, ident(b"SOCKET5"))
    client.close()


def test_unknown_second_and_reaped_requests_are_dropped_silently(
    world: World, silent_policy: SilentPolicy
) -> None:
    control = pending(world, silent_policy, b"test.Env", b"test.Env")
    unknown = RawClient(world)
    unknown.send(connect_frame(2, 600, ident(b"SOCKET99")))
    assert unknown.rest() == b""
    first = RawClient(world)
    first.send(connect_frame(2, 601, ident(b"SOCKET5")))
    assert isinstance(control.read(20), RawFrame | ServiceConnect)
    second = RawClient(world)
    second.send(connect_frame(2, 602, ident(b"SOCKET5")))
    assert second.rest() == b""
    # SOCKET6's decision ends (the fallback policy program refuses): no longer pending.
    silent_policy.release()
    assert control.read(30) == ServiceRefused(ident(b"SOCKET6"))
    late = RawClient(world)
    late.send(connect_frame(2, 603, ident(b"SOCKET6")))
    assert late.rest() == b""
    with pytest.raises(TimeoutError):
        control.read(2)


@pytest.mark.parametrize(
    "frame",
    [
        connect_frame(2, 512, ident(b"SOCKET5")),
        connect_frame(2, 769, ident(b"SOCKET5")),
        connect_frame(2, 600, b""),
        connect_frame(2, 600, b"SOCKET5"),
    ],
    ids=["port-512", "port-769", "len-8", "no-nul"],
)
def test_bad_frames_drop_the_client_and_claim_nothing(
    world: World, silent_policy: SilentPolicy, frame: bytes
) -> None:
    control = pending(world, silent_policy, b"test.Env")
    bad = RawClient(world)
    bad.send(frame)
    assert bad.rest() == b""
    with pytest.raises(TimeoutError):
        control.read(1)
    # The request is still pending: a good SERVICE_CONNECT takes it.
    good = RawClient(world)
    good.send(connect_frame(2, 700, b"SOCKET5\0"))
    assert control.read(20) == RawFrame(
        MsgType.SERVICE_CONNECT, struct.pack("<II", 2, 700) + b"SOCKET5\0"
    )
