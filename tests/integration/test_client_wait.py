"""qrexec-client -W waits for the agent's CONNECTION_TERMINATED (spec §4(i) step 10).

A scripted agent plays the VM side, so the test decides when the connection ends.
"""

from __future__ import annotations

import time

import pytest

from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import read_message
from qrexec.protocol.messages import (
    ConnectionTerminated,
    Data,
    ExecRequest,
    ExitStatus,
    Hello,
    encode,
)
from qrexec.sim import processes
from tests.integration.conftest import QrexecSystem
from tests.integration.fake_agent import FakeAgent

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("wait", [True, False])
def test_wait_option_holds_until_connection_terminated(
    qrexec_system: QrexecSystem, wait: bool
) -> None:
    agent = FakeAgent(qrexec_system.vchan_dir, 5)
    qrexec_system.start_daemon("vm5", 5)
    control = agent.accept()
    control.hello()
    processes.wait_for(qrexec_system.daemon_socket(5).exists, 30, what="the daemon socket")
    options = ("-W",) if wait else ()
    client = qrexec_system.popen_client("vm5", "user:anything", *options)
    assert client.stdin is not None and client.stdout is not None
    client.stdin.close()
    request = control.read(30)
    assert isinstance(request, ExecRequest)
    data = agent.backend.connect(0, request.connect_port, timeout=30)
    data.send(encode(Hello(4)))
    assert read_message(data.recv) == Hello(4)
    for message in (
        Data(MsgType.DATA_STDOUT, b"x"),
        Data(MsgType.DATA_STDOUT, b""),
        Data(MsgType.DATA_STDERR, b""),
        ExitStatus(3),
    ):
        data.send(encode(message))
    assert client.stdout.read() == b"x"  # read to EOF: the client is past the data phase
    data.close()
    if wait:
        time.sleep(0.5)
        assert client.poll() is None, "-W returned before CONNECTION_TERMINATED"
        control.send_raw(encode(ConnectionTerminated(0, request.connect_port)))
    assert client.wait(30) == 3
