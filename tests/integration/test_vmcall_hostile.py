"""Hostile triggers from a scripted agent speaking raw bytes to a real qrexec-daemon.

The rule (spec §3.6, §4(iv), §13): a protocol violation - a trigger type the negotiated
version does not allow, a service name without its NUL or over the cap - drops that
agent's connection; well-framed but invalid content is sanitised (names) or refused with
SERVICE_REFUSED and no policy call (request ids, empty names). At most 256 requests wait
for policy per VM. Throughout, a second VM keeps being served. Also ``qrexec-client -c``,
the pre-R4.2.19 way of completing a pending request.
"""

from __future__ import annotations

import contextlib
import getpass
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator

import pytest

from qrexec.backends.socket import SocketBackend
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import (
    Data,
    ExitStatus,
    Hello,
    ServiceConnect,
    ServiceRefused,
    TriggerService,
    TriggerService3,
    encode,
)
from tests.integration.fake_agent import FakeAgent, RawControl
from tests.integration.vmcall_support import SERVICE_ECHO_ENV, VmCallSystem, vm_uuid, vmcalls

pytestmark = pytest.mark.timeout(180)
__all__ = ["vmcalls"]


def ident(text: bytes) -> bytes:
    return text + b"\0" * (32 - len(text))


def trigger4(service: bytes, target: bytes = b"vm2", request_id: bytes = b"SOCKET1") -> bytes:
    """A TRIGGER_SERVICE4 frame built by hand, so any 32-byte request id can be sent."""
    payload = b"\0" * 64 + target.ljust(64, b"\0") + request_id.ljust(32, b"\0") + service + b"\0"
    return struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload


class World:
    """vm1 is the scripted agent (domain 1, our daemon); vm2 is a real VM."""

    def __init__(self, vmcalls: VmCallSystem, version: int = 4) -> None:
        self.vmcalls = vmcalls
        self.system = vmcalls.system
        self.fake = FakeAgent(self.system.vchan_dir, 1)
        self.version = version

    def start_vm1(self, daemon_env: dict[str, str] | None = None) -> RawControl:
        vmcalls = self.vmcalls
        vmcalls.vms["vm1"] = self.system.domain("vm1", 1)
        vmcalls.write_system_info({n: d.domid for n, d in vmcalls.vms.items()})
        env = vmcalls.dom0_env()
        env.update(daemon_env or {})
        self.system.start_daemon("vm1", 1, env, args=["-u", vm_uuid(1), "-p", "/bin/false"])
        return self.connect()

    def connect(self) -> RawControl:
        control = self.fake.accept(30)
        control.hello(self.version)
        return control

    def vm2_still_served(self) -> None:
        result = self.system.client("vm2", f"{getpass.getuser()}:echo alive")
        assert (result.returncode, result.stdout) == (0, b"alive\n"), result.stderr


@pytest.fixture
def world(vmcalls: VmCallSystem) -> World:
    vmcalls.write_policy("test.Env * vm1 vm2 allow\ntest.Deny * vm1 vm2 deny\n")
    vmcalls.start_policy_daemon()
    vmcalls.start_vm("vm2", 2)
    vmcalls.vms["vm2"].write_service("test.Env", SERVICE_ECHO_ENV)
    return World(vmcalls)


def expect_refused(control: RawControl, raw_ident: bytes) -> None:
    reply = control.read(20)
    assert reply == ServiceRefused(raw_ident), reply


def test_bad_characters_are_sanitised(world: World) -> None:
    control = world.start_vm1()
    control.send_raw(trigger4(b"test.A$dd+x y/z", target=b"vm2;rm -rf", request_id=b"SOCKET7"))
    expect_refused(control, ident(b"SOCKET7"))
    (decision,) = world.vmcalls.audit()
    assert decision["service"] == "test.A_dd"
    assert decision["argument"] == "+x_y_z"
    assert decision["requested_target"] == "vm2_rm_-rf"
    # Sanitised names simply fail to match (or match) policy; the connection stays.
    control.send_raw(trigger4(b"test.Deny", request_id=b"SOCKET8"))
    expect_refused(control, ident(b"SOCKET8"))
    world.vm2_still_served()


def test_target_without_nul_is_cut(world: World) -> None:
    control = world.start_vm1()
    payload = b"" + b"v" * 64 + ident(b"SOCKET3") + b"test.Deny\0"
    control.send_raw(struct.pack("<II", MsgType.TRIGGER_SERVICE3, len(payload)) + payload)
    expect_refused(control, ident(b"SOCKET3"))
    (decision,) = world.vmcalls.audit()
    assert decision["requested_target"] == "v" * 63


@pytest.mark.parametrize(
    "raw_ident",
    [
        ident(b"SOCKET1\0garbage"),  # bytes after the NUL
        b"S" * 32,  # no NUL at all
        ident(b"SOCK/ET1"),  # a forbidden character
    ],
    ids=["garbage-after-nul", "missing-nul", "bad-char"],
)
def test_bad_request_ids_are_refused_without_policy(world: World, raw_ident: bytes) -> None:
    control = world.start_vm1()
    control.send_raw(trigger4(b"test.Env", request_id=raw_ident))
    expect_refused(control, raw_ident)
    control.send_raw(trigger4(b"+arg-only", request_id=b"SOCKET2"))
    expect_refused(control, ident(b"SOCKET2"))
    assert world.vmcalls.audit() == []
    control.send_raw(trigger4(b"test.Deny", request_id=b"SOCKET3"))
    expect_refused(control, ident(b"SOCKET3"))
    assert len(world.vmcalls.audit()) == 1
    world.vm2_still_served()


def service_name_without_nul() -> bytes:
    payload = b"\0" * 64 + ident(b"SOCKET1") + b"test.Env"
    return struct.pack("<II", MsgType.TRIGGER_SERVICE3, len(payload)) + payload


def raw_trigger4(tail: bytes) -> bytes:
    """A TRIGGER_SERVICE4 whose name tail is ``tail`` exactly (no NUL added)."""
    payload = b"\0" * 64 + b"vm2".ljust(64, b"\0") + ident(b"SOCKET1") + tail
    return struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload


def oversize_name() -> bytes:
    payload = b"\0" * 64 + b"vm2".ljust(64, b"\0") + ident(b"SOCKET1") + b"a" * 65001 + b"\0"
    return struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload


def nul_inside_name() -> bytes:
    return encode(TriggerService3(b"vm2", b"SOCKET1", b"x")).replace(b"x\0", b"\0\0")


@pytest.mark.parametrize(
    "frame",
    [
        service_name_without_nul(),
        nul_inside_name(),
        raw_trigger4(b"a\0a"),
    ],
    ids=["missing-nul", "nul-inside", "nul-inside-unterminated"],
)
def test_name_nul_rules_refuse_and_keep_the_agent(world: World, frame: bytes) -> None:
    """Spec §15.2: refused with the request id echoed, no policy asked, the agent kept."""
    control = world.start_vm1()
    control.send_raw(frame)
    expect_refused(control, ident(b"SOCKET1"))
    assert world.vmcalls.audit() == []
    control.send_raw(trigger4(b"test.Deny", request_id=b"SOCKET2"))
    expect_refused(control, ident(b"SOCKET2"))
    assert len(world.vmcalls.audit()) == 1
    assert not control.is_dropped(0.5)


def test_section_15_2_sanitising_example(world: World) -> None:
    """``a/b c\\xff+x y`` reaches the policy as ``a_b_c_+x_y``; a full-length v4 source
    loses its last byte and is sanitised; nothing is refused for it."""
    control = world.start_vm1()
    payload = b"s" * 62 + b"/!" + b"vm2".ljust(64, b"\0") + ident(b"SOCKET4") + b"a/b c\xff+x y\0"
    control.send_raw(struct.pack("<II", MsgType.TRIGGER_SERVICE4, len(payload)) + payload)
    expect_refused(control, ident(b"SOCKET4"))
    (decision,) = world.vmcalls.audit()
    assert (decision["service"], decision["argument"]) == ("a_b_c_", "+x_y")
    assert decision["requested_source"] == "s" * 62 + "_"


@pytest.mark.parametrize(
    "frame",
    [
        oversize_name(),
        encode(TriggerService(b"test.Env", b"vm2", b"SOCKET1")),  # v2 type on a v4 channel
    ],
    ids=["oversize-name", "v2-trigger-on-v4"],
)
def test_protocol_violations_drop_the_agent(world: World, frame: bytes) -> None:
    control = world.start_vm1()
    control.send_raw(frame)
    assert control.is_dropped(20)
    assert "dropping the agent" in world.system.log_text("daemon", "vm1")
    world.vm2_still_served()
    # The daemon waits for the agent again and serves it normally.
    again = world.connect()
    again.send_raw(trigger4(b"test.Deny", request_id=b"SOCKET9"))
    expect_refused(again, ident(b"SOCKET9"))


def test_v4_trigger_on_a_v3_channel_drops(world: World) -> None:
    control = world.start_vm1({"QREXEC_PROTOCOL_VERSION": "3"})
    assert control.version == 3
    control.send_raw(encode(TriggerService3(b"vm2", b"SOCKET1", b"test.Deny")))
    expect_refused(control, ident(b"SOCKET1"))
    control.send_raw(trigger4(b"test.Deny", request_id=b"SOCKET2"))
    assert control.is_dropped(20)


def test_longest_service_name_is_accepted(world: World) -> None:
    control = world.start_vm1()
    name = b"test.Deny+" + b"a" * (64999 - len(b"test.Deny+"))
    control.send_raw(trigger4(name, request_id=b"SOCKET1"))
    expect_refused(control, ident(b"SOCKET1"))
    (decision,) = world.vmcalls.audit()
    assert decision["result"] == "deny"


class SilentPolicy:
    """A policy socket that accepts queries and answers nothing until released."""

    def __init__(self, path: str) -> None:
        self.server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.server.bind(path)
        self.server.listen(512)
        self.connections: list[socket.socket] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.connections.append(conn)

    def count(self) -> int:
        with self.lock:
            return len(self.connections)

    def release(self) -> None:
        # shutdown() wakes the accepting thread; close() alone would leave it listening.
        with contextlib.suppress(OSError):
            self.server.shutdown(socket.SHUT_RDWR)
        self.server.close()
        self.thread.join(5)
        with self.lock:
            for conn in self.connections:
                conn.close()


@pytest.fixture
def silent_policy(world: World) -> Iterator[SilentPolicy]:
    path = world.vmcalls.base / "silent-policy.sock"
    policy = SilentPolicy(str(path))
    try:
        yield policy
    finally:
        policy.release()


def test_at_most_256_pending_requests(world: World, silent_policy: SilentPolicy) -> None:
    path = world.vmcalls.base / "silent-policy.sock"
    control = world.start_vm1({"QREXEC_POLICY_SOCKET": str(path)})
    control.send_raw(
        b"".join(trigger4(b"test.Env", request_id=b"SOCKET%d" % n) for n in range(300))
    )
    # Requests 256..299 find the table full and are refused at once.
    refused = [control.read(20) for _ in range(44)]
    assert refused == [ServiceRefused(ident(b"SOCKET%d" % n)) for n in range(256, 300)]
    world.vm2_still_served()
    # The silent policy gives no answer: the daemon falls back to the policy program
    # (/bin/false here), which fails, so every waiting request is refused.
    silent_policy.release()
    answers = {control.read(30) for _ in range(256)}
    assert answers == {ServiceRefused(ident(b"SOCKET%d" % n)) for n in range(256)}
    # Slots are free again.
    control.send_raw(trigger4(b"test.Env", request_id=b"SOCKET300"))
    expect_refused(control, ident(b"SOCKET300"))


def test_qrexec_client_connect_completes_a_pending_request(
    world: World, silent_policy: SilentPolicy
) -> None:
    """``qrexec-client -c REQID,SRC,SRCID``: the older way dom0 completes a VM → VM call."""
    path = world.vmcalls.base / "silent-policy.sock"
    control = world.start_vm1({"QREXEC_POLICY_SOCKET": str(path)})
    control.send_raw(trigger4(b"test.Env+c", request_id=b"SOCKET5"))
    while silent_policy.count() == 0:  # the request is pending once policy is asked
        threading.Event().wait(0.05)
    argv = [
        sys.executable,
        "-m",
        "qrexec.client.cli",
        "-d",
        "vm2",
        "-c",
        "SOCKET5,vm1,1",
        f"{getpass.getuser()}:QUBESRPC test.Env+c vm1",
    ]
    done = subprocess.run(argv, capture_output=True, env=world.system.env(0), timeout=60)
    assert done.returncode == 0, done.stderr
    connect = control.read(20)
    assert isinstance(connect, ServiceConnect)
    assert (connect.connect_domain, connect.ident) == (2, ident(b"SOCKET5"))
    # Act as qrexec-client-vm: vchan server of (vm2, port), caller side of the data phase.
    backend = SocketBackend(1, world.system.vchan_dir)
    listener = backend.listen(2, connect.connect_port)
    stream = listener.accept(30)
    stream.send(encode(Hello(4)))
    stream.send(encode(Data(MsgType.DATA_STDIN, b"")))
    decoder = FrameDecoder(4, own_version=4)
    output, code = b"", None
    while code is None:
        data = stream.recv(65536)
        assert data, "the service side closed without an exit code"
        for message in decoder.feed(data):
            if isinstance(message, Data) and message.msg_type is MsgType.DATA_STDOUT:
                output += message.data
            elif isinstance(message, ExitStatus):
                code = message.code
    stream.close()
    assert code == 3
    assert output.decode().splitlines()[:3] == ["arg=c", "remote=vm1", "full=test.Env+c"]
    # The policy's late answer finds nothing pending: no second answer reaches the agent.
    silent_policy.release()
    with pytest.raises(TimeoutError):
        control.read(3)


def test_v2_fields_lose_their_last_byte(world: World) -> None:
    """Spec §15.2, v2: byte 63 of the name and byte 31 of the target are forced to NUL;
    a name field holding ``\\0a`` is empty and refused without policy."""
    world.version = 2
    control = world.start_vm1()
    assert control.version == 2
    name = b"test.Deny+" + b"a" * 54
    payload = name + b"v" * 32 + ident(b"SOCKET1")
    control.send_raw(struct.pack("<II", MsgType.TRIGGER_SERVICE, len(payload)) + payload)
    expect_refused(control, ident(b"SOCKET1"))
    (decision,) = world.vmcalls.audit()
    assert (decision["service"], decision["argument"]) == ("test.Deny", "+" + "a" * 53)
    assert decision["requested_target"] == "v" * 31
    payload = b"\0a".ljust(64, b"\0") + b"vm2".ljust(32, b"\0") + ident(b"SOCKET2")
    control.send_raw(struct.pack("<II", MsgType.TRIGGER_SERVICE, len(payload)) + payload)
    expect_refused(control, ident(b"SOCKET2"))
    assert len(world.vmcalls.audit()) == 1
    assert not control.is_dropped(0.5)
