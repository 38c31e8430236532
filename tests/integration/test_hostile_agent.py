"""A hostile agent against a real daemon (spec §3, §4(iv), §13).

The rule under test: a *protocol violation* drops that agent's connection (and the daemon
waits for the agent again; R4.3's daemon exits there - a deliberate difference, see
docs/decisions.md); *well-framed but invalid content* is refused with SERVICE_REFUSED,
echoing the 32 ident bytes, and the connection stays - including a trigger's service name
without its NUL terminator or with a NUL before it (spec §15.2). Throughout, the
daemon of a second, healthy VM keeps serving its clients, and the hostile VM's daemon
keeps running.

Frames are built by hand (``frame``) so that malformed ones can be expressed at all.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from qrexec.protocol.messages import ServiceRefused
from qrexec.sim import processes
from tests.integration.conftest import QrexecSystem
from tests.integration.fake_agent import FakeAgent, RawControl

pytestmark = pytest.mark.timeout(120)

HELLO = 0x300
EXEC_CMDLINE = 0x200
SERVICE_CONNECT = 0x202
DATA_STDOUT = 0x191
CONNECTION_TERMINATED = 0x211
TRIGGER_V2 = 0x210
TRIGGER_V3 = 0x212
TRIGGER_V4 = 0x213


def frame(msg_type: int, payload: bytes, length: int | None = None) -> bytes:
    """A frame with a little-endian header; ``length`` may lie about the payload."""
    return struct.pack("<II", msg_type, len(payload) if length is None else length) + payload


def pad(value: bytes, size: int) -> bytes:
    return value + b"\0" * (size - len(value))


def trigger3(service: bytes, ident: bytes = pad(b"SOCKET7", 32), target: bytes = b"vm1") -> bytes:
    return frame(TRIGGER_V3, pad(target, 64) + ident + service)


def trigger4(service: bytes, ident: bytes = pad(b"SOCKET7", 32)) -> bytes:
    return frame(TRIGGER_V4, pad(b"", 64) + pad(b"vm1", 64) + ident + service)


def trigger2(service: bytes = b"qubes.Test", ident: bytes = pad(b"SOCKET7", 32)) -> bytes:
    return frame(TRIGGER_V2, pad(service, 64) + pad(b"vm1", 32) + ident)


@dataclass
class Hostile:
    system: QrexecSystem
    agent: FakeAgent
    daemon: processes.ProcessRecord

    def connect(self, version: int = 4) -> RawControl:
        control = self.agent.accept()
        control.hello(version)
        return control

    def assert_healthy(self) -> None:
        """The hostile VM's daemon runs; the healthy VM's daemon serves a call."""
        assert processes.is_alive(self.daemon), "the hostile VM's daemon died"
        result = self.system.client("vm1", f"{self.system.user}:echo still serving")
        assert (result.returncode, result.stdout) == (0, b"still serving\n")


@pytest.fixture
def hostile(qrexec_system: QrexecSystem) -> Iterator[Hostile]:
    qrexec_system.start_vm("vm1", 1)
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    daemon = qrexec_system.start_daemon("vm5", 5)
    yield Hostile(qrexec_system, agent, daemon)


VIOLATIONS = {
    "unknown-type": (4, frame(0x999, b"")),
    "data-on-control": (4, frame(DATA_STDOUT, b"abc")),
    "exec-from-agent": (4, frame(EXEC_CMDLINE, struct.pack("<II", 0, 513) + b"u:true\0")),
    "service-connect-from-agent": (
        4,
        frame(SERVICE_CONNECT, struct.pack("<II", 0, 513) + pad(b"x", 32)),
    ),
    "second-hello": (4, frame(HELLO, struct.pack("<I", 4))),
    "terminated-wrong-size": (4, frame(CONNECTION_TERMINATED, struct.pack("<III", 0, 513, 0))),
    "terminated-port-below-range": (4, frame(CONNECTION_TERMINATED, struct.pack("<II", 0, 512))),
    "terminated-port-above-range": (4, frame(CONNECTION_TERMINATED, struct.pack("<II", 0, 769))),
    "v2-trigger-under-v4": (4, trigger2()),
    "v2-trigger-under-v3": (3, trigger2()),
    "v4-trigger-under-v3": (3, trigger4(b"qubes.Test\0")),
    "v3-trigger-under-v2": (2, trigger3(b"qubes.Test\0")),
    "v2-trigger-wrong-size": (2, frame(TRIGGER_V2, b"\0" * 127)),
    "name-over-cap": (3, trigger3(b"a" * 65000 + b"\0")),
    "length-over-any-cap": (4, struct.pack("<II", DATA_STDOUT, 0xFFFFFFFF)),
    "hello-length-lie": (4, frame(HELLO, b"", length=0x7FFFFFFF)),
    "empty-v3-trigger": (3, frame(TRIGGER_V3, b"\0" * 96)),
    "empty-v4-trigger": (4, frame(TRIGGER_V4, b"\0" * 160)),
    "v4-name-over-cap": (4, trigger4(b"a" * 65000 + b"\0")),
}


@pytest.mark.parametrize("case", sorted(VIOLATIONS))
def test_protocol_violation_drops_the_agent(hostile: Hostile, case: str) -> None:
    version, data = VIOLATIONS[case]
    control = hostile.connect(version)
    control.send_raw(data)
    assert control.is_dropped(), f"{case}: the daemon kept the connection"
    # The daemon waits for the agent again, and serves the next connection.
    control = hostile.connect(version)
    control.send_raw(struct.pack("<II", CONNECTION_TERMINATED, 8) + struct.pack("<II", 0, 600))
    assert not control.is_dropped(0.5)
    assert "qrexec.vm5" in {p.name for p in hostile.system.socket_dir.iterdir()}
    hostile.assert_healthy()
    assert "protocol violation" in hostile.system.log_text("daemon", "vm5")


def test_bad_hello_versions_are_refused(hostile: Hostile) -> None:
    for first in (frame(HELLO, struct.pack("<I", 1)), frame(TRIGGER_V3, b"x" * 97)):
        control = hostile.agent.accept()
        control.start_reading()
        control.send_raw(first)
        assert control.is_dropped(), first
    hostile.assert_healthy()


def test_a_stalled_partial_frame_blocks_nothing(hostile: Hostile) -> None:
    control = hostile.connect()
    control.send_raw(struct.pack("<II", TRIGGER_V3, 200)[:5])
    hostile.assert_healthy()
    control.send_raw(struct.pack("<II", TRIGGER_V3, 200)[5:] + b"\0" * 50)
    hostile.assert_healthy()
    control.close()


REFUSALS = {
    "ident-bad-character": (3, trigger3(b"qubes.Test\0", ident=pad(b"SOCKET\x017", 32))),
    "ident-without-nul": (3, trigger3(b"qubes.Test\0", ident=b"A" * 32)),
    "ident-garbage-after-nul": (3, trigger3(b"qubes.Test\0", ident=pad(b"SOCKET7\0junk", 32))),
    "ident-newline": (4, trigger4(b"qubes.Test\0", ident=pad(b"SOCKET\n", 32))),
    "empty-service-name": (3, trigger3(b"\0")),
    "service-name-only-argument": (4, trigger4(b"+arg\0")),
    "v2-ident-bad-character": (2, trigger2(ident=pad(b"SOCKET/1", 32))),
    "v2-empty-service-name": (2, trigger2(service=b"")),
    # §15.2: a v3/v4 name tail without its NUL, or with a NUL before it, is refused and
    # the connection stays (upstream does not exit there).
    "v3-name-without-terminator": (3, trigger3(b"a")),
    "v3-nul-nul": (3, trigger3(b"\0\0")),
    "v3-nul-a": (3, trigger3(b"\0a\0")),
    "v3-a-nul-nul": (3, trigger3(b"a\0\0")),
    "v3-a-nul-a": (3, trigger3(b"a\0a\0")),
    "v3-nul-inside-name": (3, trigger3(b"qubes\0Test\0")),
    "v3-plus": (3, trigger3(b"+\0")),
    "v4-name-without-terminator": (4, trigger4(b"qubes.Test")),
    "v4-nul-nul": (4, trigger4(b"\0\0")),
    "v4-a-nul-a-unterminated": (4, trigger4(b"a\0a")),
    "v4-plus-a": (4, trigger4(b"+a\0")),
    # v2: the fixed field is cut at its first NUL, so "\0a" is an empty name.
    "v2-nul-a": (2, trigger2(service=b"\0a")),
    "v2-plus": (2, trigger2(service=b"+a")),
    # Refused, not dropped: the 32 request-id bytes are echoed even when invalid too.
    "v4-bad-ident-and-bad-name": (4, trigger4(b"a", ident=b"\xff" * 32)),
}


@pytest.mark.parametrize("version", [2, 3, 4])
def test_invalid_content_is_refused_and_the_connection_stays(
    hostile: Hostile, version: int
) -> None:
    control = hostile.connect(version)
    cases = {name: data for name, (v, data) in REFUSALS.items() if v == version}
    assert cases
    for name, data in cases.items():
        control.send_raw(data)
        reply = control.read(10)
        ident_offset = {2: 8 + 96, 3: 8 + 64, 4: 8 + 128}[version]
        assert reply == ServiceRefused(data[ident_offset : ident_offset + 32]), name
        hostile.assert_healthy()
    assert not control.is_dropped(0.5)
    control.close()
