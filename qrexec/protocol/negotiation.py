"""HELLO version negotiation and what the negotiated version decides (spec §3.4).

Rules:

- Control and data vchans: each side sends HELLO(own) first, without waiting, then reads
  the peer's; the effective version is ``min(own, peer)``. Below 2 is refused.
- Our own version is :data:`MAX_PROTOCOL_VERSION` (4) unless the environment variable
  ``QREXEC_PROTOCOL_VERSION`` caps it (2, 3 or 4), so v2 and v3 peers can be imitated end
  to end. Any other value is an error naming the variable, never a silent default.
- The daemon's unix socket: the daemon offers exactly 3 and accepts a client reply of 3 or
  more (R4.3+); our client offers exactly 3, which R4.2 daemons demand.
- The version decides the largest data chunk (4096 bytes in v2, 65536 from v3) and which
  trigger message the daemon accepts (TRIGGER_SERVICE below 3, TRIGGER_SERVICE3 from 3,
  TRIGGER_SERVICE4 from 4) and so which one an agent must send.

Does no I/O: the environment is read only when the caller passes none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import (
    CLIENT_SOCKET_PROTOCOL_VERSION,
    MAX_DATA_CHUNK_V2,
    MAX_DATA_CHUNK_V3,
    MAX_PROTOCOL_VERSION,
    MIN_PROTOCOL_VERSION,
    PROTOCOL_V3,
    PROTOCOL_V4,
    PROTOCOL_VERSION_ENV,
    MsgType,
)

_TRIGGER_TYPES = (MsgType.TRIGGER_SERVICE, MsgType.TRIGGER_SERVICE3, MsgType.TRIGGER_SERVICE4)


def check_version(version: int) -> int:
    """Return ``version`` if we can speak it (2..4); LocalProtocolError otherwise."""
    if not MIN_PROTOCOL_VERSION <= version <= MAX_PROTOCOL_VERSION:
        raise LocalProtocolError(
            f"protocol version {version} is not supported"
            f" (expected {MIN_PROTOCOL_VERSION}..{MAX_PROTOCOL_VERSION})"
        )
    return version


def own_protocol_version(env: Mapping[str, str] | None = None) -> int:
    """The version we offer in HELLO: 4, or the cap set by ``QREXEC_PROTOCOL_VERSION``.

    An unset or empty variable means no cap. Anything but 2, 3 or 4 raises
    LocalProtocolError naming the variable and the bad value.
    """
    environ = os.environ if env is None else env
    raw = environ.get(PROTOCOL_VERSION_ENV, "").strip()
    if not raw:
        return MAX_PROTOCOL_VERSION
    allowed = ", ".join(str(v) for v in range(MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION + 1))
    if (
        not raw.isascii()
        or not raw.isdigit()
        or int(raw) not in range(MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION + 1)
    ):
        raise LocalProtocolError(
            f"{PROTOCOL_VERSION_ENV}={raw!r} is not a protocol version we speak"
            f" (expected one of {allowed})"
        )
    return int(raw)


def negotiate(own: int, peer: int) -> int:
    """The effective version: ``min(own, peer)``; a peer below 2 is a remote error."""
    check_version(own)
    if peer < MIN_PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"peer speaks protocol version {peer}; at least {MIN_PROTOCOL_VERSION} is required"
        )
    return min(own, peer)


def negotiate_client_socket(peer: int) -> int:
    """Check the HELLO received on the daemon's unix socket (either side).

    Both sides send :data:`CLIENT_SOCKET_PROTOCOL_VERSION` (3); a peer offering 3 or more
    is accepted as R4.3 does, and the socket then speaks version 3.
    """
    if peer < CLIENT_SOCKET_PROTOCOL_VERSION:
        raise RemoteProtocolError(
            f"daemon socket peer speaks protocol version {peer};"
            f" at least {CLIENT_SOCKET_PROTOCOL_VERSION} is required"
        )
    return CLIENT_SOCKET_PROTOCOL_VERSION


def max_data_chunk(version: int) -> int:
    """Largest DATA_* payload under ``version``: 4096 in v2, 65536 from v3."""
    check_version(version)
    return MAX_DATA_CHUNK_V2 if version < PROTOCOL_V3 else MAX_DATA_CHUNK_V3


def trigger_type_for_version(version: int) -> MsgType:
    """The trigger message an agent must send to a daemon speaking ``version``."""
    check_version(version)
    if version >= PROTOCOL_V4:
        return MsgType.TRIGGER_SERVICE4
    if version >= PROTOCOL_V3:
        return MsgType.TRIGGER_SERVICE3
    return MsgType.TRIGGER_SERVICE


def trigger_allowed(msg_type: int, version: int) -> bool:
    """Whether a daemon at ``version`` accepts this trigger type (upstream's gate).

    TRIGGER_SERVICE only below v3, TRIGGER_SERVICE3 from v3, TRIGGER_SERVICE4 from v4;
    upstream's daemon exits on any other combination.
    """
    check_version(version)
    if msg_type == MsgType.TRIGGER_SERVICE:
        return version < PROTOCOL_V3
    if msg_type == MsgType.TRIGGER_SERVICE3:
        return version >= PROTOCOL_V3
    if msg_type == MsgType.TRIGGER_SERVICE4:
        return version >= PROTOCOL_V4
    return False


def agent_message_types(version: int) -> frozenset[MsgType]:
    """Types a daemon accepts on the control vchan from an agent at ``version``.

    Meant as ``FrameDecoder(allowed=...)`` once HELLO is done: the triggers the version
    permits plus CONNECTION_TERMINATED.
    """
    triggers = {kind for kind in _TRIGGER_TYPES if trigger_allowed(kind, version)}
    return frozenset({MsgType.CONNECTION_TERMINATED, *triggers})
