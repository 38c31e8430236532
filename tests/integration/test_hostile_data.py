"""A hostile VM on the data vchan: qrexec-client fails cleanly, never hangs or balloons."""

from __future__ import annotations

import struct

import pytest

from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import ExecRequest, Hello, encode
from qrexec.sim import processes
from tests.integration.conftest import QrexecSystem
from tests.integration.fake_agent import FakeAgent

pytestmark = pytest.mark.timeout(120)

STDOUT = 0x191
STDIN = 0x190

BAD_DATA = {
    "chunk-over-v3-cap": (4, struct.pack("<II", STDOUT, 65537) + b"x" * 65537),
    "chunk-over-v2-cap": (2, struct.pack("<II", STDOUT, 4097) + b"x" * 4097),
    "huge-length": (4, struct.pack("<II", STDOUT, 0xFFFFFFFF)),
    "unknown-type": (4, struct.pack("<II", 0x777, 0)),
    "stdin-from-the-service": (4, struct.pack("<II", STDIN, 1) + b"x"),
    "control-message-on-data": (4, struct.pack("<II", 0x200, 9) + b"\0" * 8 + b"\0"),
    "closed-mid-frame": (4, struct.pack("<II", STDOUT, 100) + b"x" * 10),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_client_survives_a_hostile_service_side(qrexec_system: QrexecSystem, case: str) -> None:
    version, data = BAD_DATA[case]
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5)
    control = agent.accept()
    control.hello()
    processes.wait_for(qrexec_system.daemon_socket(5).exists, 30, what="the daemon socket")
    client = qrexec_system.popen_client("vm5", "user:anything")
    assert client.stdin is not None
    request = control.read(30)
    assert isinstance(request, ExecRequest)
    stream = agent.backend.connect(0, request.connect_port, timeout=30)
    stream.send(encode(Hello(version)))
    assert isinstance(read_message(stream.recv), Hello)
    stream.send(data)
    if case == "closed-mid-frame":
        stream.close()
    # Otherwise the vchan stays open: the client must give up on the bad header itself.
    _, err = client.communicate(timeout=30)
    stream.close()
    assert client.returncode == 255, err
    assert b"Traceback" not in err
