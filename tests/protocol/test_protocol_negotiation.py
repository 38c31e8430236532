"""HELLO negotiation, the QREXEC_PROTOCOL_VERSION cap, and what the version decides."""

from __future__ import annotations

import pytest

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import Hello, encode
from qrexec.protocol.negotiation import (
    agent_message_types,
    max_data_chunk,
    negotiate,
    negotiate_client_socket,
    own_protocol_version,
    trigger_allowed,
    trigger_type_for_version,
)


@pytest.mark.parametrize(
    ("own", "peer", "expected"),
    [(4, 4, 4), (4, 3, 3), (4, 2, 2), (3, 4, 3), (2, 4, 2), (4, 99, 4), (3, 3, 3)],
)
def test_negotiate_is_min(own: int, peer: int, expected: int) -> None:
    assert negotiate(own, peer) == expected


@pytest.mark.parametrize("peer", [0, 1])
def test_peer_below_2_is_refused(peer: int) -> None:
    with pytest.raises(RemoteProtocolError, match=f"version {peer}; at least 2"):
        negotiate(4, peer)


@pytest.mark.parametrize("own", [0, 1, 5])
def test_own_version_out_of_range_is_local_error(own: int) -> None:
    with pytest.raises(LocalProtocolError):
        negotiate(own, 3)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, 4),
        ({"QREXEC_PROTOCOL_VERSION": ""}, 4),
        ({"QREXEC_PROTOCOL_VERSION": "2"}, 2),
        ({"QREXEC_PROTOCOL_VERSION": "3"}, 3),
        ({"QREXEC_PROTOCOL_VERSION": " 4 "}, 4),
    ],
)
def test_own_protocol_version_from_env(env: dict[str, str], expected: int) -> None:
    assert own_protocol_version(env) == expected


@pytest.mark.parametrize("value", ["1", "5", "0", "-3", "three", "3.0", "٣", "99999999999"])
def test_invalid_env_cap_is_a_clear_error(value: str) -> None:
    with pytest.raises(LocalProtocolError, match=r"QREXEC_PROTOCOL_VERSION=.*expected one of 2"):
        own_protocol_version({"QREXEC_PROTOCOL_VERSION": value})


def test_own_protocol_version_reads_process_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QREXEC_PROTOCOL_VERSION", "3")
    assert own_protocol_version() == 3
    monkeypatch.delenv("QREXEC_PROTOCOL_VERSION")
    assert own_protocol_version() == 4


def test_env_cap_drives_the_decoder_end_to_end() -> None:
    """A v2-capped side judges a v4 peer's chunks by the v2 limit."""
    own = own_protocol_version({"QREXEC_PROTOCOL_VERSION": "2"})
    decoder = FrameDecoder(own_version=own)
    decoder.feed(encode(Hello(4)))
    assert decoder.version == 2
    assert decoder.max_buffered == 8 + 65535


@pytest.mark.parametrize(("peer", "ok"), [(3, True), (4, True), (7, True), (2, False), (0, False)])
def test_client_socket_accepts_3_or_more(peer: int, ok: bool) -> None:
    if ok:
        assert negotiate_client_socket(peer) == 3
    else:
        with pytest.raises(RemoteProtocolError, match="at least 3"):
            negotiate_client_socket(peer)


@pytest.mark.parametrize(("version", "size"), [(2, 4096), (3, 65536), (4, 65536)])
def test_max_data_chunk(version: int, size: int) -> None:
    assert max_data_chunk(version) == size


def test_max_data_chunk_rejects_unknown_versions() -> None:
    with pytest.raises(LocalProtocolError):
        max_data_chunk(1)


@pytest.mark.parametrize(
    ("version", "v2", "v3", "v4", "send"),
    [
        (2, True, False, False, MsgType.TRIGGER_SERVICE),
        (3, False, True, False, MsgType.TRIGGER_SERVICE3),
        (4, False, True, True, MsgType.TRIGGER_SERVICE4),
    ],
)
def test_trigger_gate(version: int, v2: bool, v3: bool, v4: bool, send: MsgType) -> None:
    assert trigger_allowed(MsgType.TRIGGER_SERVICE, version) is v2
    assert trigger_allowed(MsgType.TRIGGER_SERVICE3, version) is v3
    assert trigger_allowed(MsgType.TRIGGER_SERVICE4, version) is v4
    assert trigger_allowed(MsgType.HELLO, version) is False
    assert trigger_type_for_version(version) is send
    assert trigger_allowed(send, version)
    allowed = agent_message_types(version)
    assert MsgType.CONNECTION_TERMINATED in allowed
    assert (MsgType.TRIGGER_SERVICE in allowed) is v2
    assert (MsgType.TRIGGER_SERVICE4 in allowed) is v4
