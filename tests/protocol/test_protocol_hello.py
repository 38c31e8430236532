"""The sans-I/O HELLO reader halves used by every program's handshake."""

from __future__ import annotations

import pytest

from qrexec.errors import RemoteProtocolError
from qrexec.protocol.framing import hello_length, hello_version


def test_hello_header_and_payload_from_hand_written_bytes() -> None:
    # MSG_HELLO = 0x300, length 4; payload: version 3, little-endian.
    assert hello_length(bytes.fromhex("00030000 04000000")) == 4
    assert hello_version(bytes.fromhex("03000000")) == 3


@pytest.mark.parametrize(
    "header",
    [
        bytes.fromhex("90010000 04000000"),  # DATA_STDOUT where HELLO was due
        bytes.fromhex("00030000 05000000"),  # HELLO of the wrong size
        bytes.fromhex("ffff0000 04000000"),  # unknown type
    ],
)
def test_anything_but_a_hello_header_is_the_peers_fault(header: bytes) -> None:
    with pytest.raises(RemoteProtocolError):
        hello_length(header)
