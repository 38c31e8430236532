"""Every qrexec message as a frozen dataclass, with the exact C layouts of spec §3.3.

``encode(msg)`` gives the full frame (8-byte header + payload); ``decode_payload(type,
payload)`` turns a received payload back into a message. Fixed string fields are kept as
the raw bytes received (padding included) so that validation (:mod:`.fields`) can apply the
NUL rules of §3.6/§13; encoders NUL-pad what they are given.

Layouts only: length caps that depend on the negotiated version, and which message may
appear where, are the framing decoder's and the programs' business. Does no I/O.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Final

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import (
    HEADER_SIZE,
    IDENT_SIZE,
    V2_SERVICE_NAME_SIZE,
    V2_TARGET_DOMAIN_SIZE,
    V3_TARGET_DOMAIN_SIZE,
    V4_SOURCE_DOMAIN_SIZE,
    MsgType,
)

HEADER: Final = struct.Struct("<II")
EXEC_PARAMS: Final = struct.Struct("<II")
EXIT_CODE: Final = struct.Struct("<i")
PEER_INFO: Final = struct.Struct("<I")

EXEC_TYPES: Final = frozenset({MsgType.EXEC_CMDLINE, MsgType.JUST_EXEC})
DATA_TYPES: Final = frozenset({MsgType.DATA_STDIN, MsgType.DATA_STDOUT, MsgType.DATA_STDERR})
TRIGGER_V2_SIZE: Final = V2_SERVICE_NAME_SIZE + V2_TARGET_DOMAIN_SIZE + IDENT_SIZE
TRIGGER_V3_PREFIX: Final = V3_TARGET_DOMAIN_SIZE + IDENT_SIZE
TRIGGER_V4_PREFIX: Final = V4_SOURCE_DOMAIN_SIZE + V3_TARGET_DOMAIN_SIZE + IDENT_SIZE


def pad_field(value: bytes, size: int, what: str) -> bytes:
    """NUL-pad ``value`` to ``size`` bytes, leaving room for at least one NUL."""
    if len(value) >= size:
        raise LocalProtocolError(f"{what} is {len(value)} bytes; the field holds {size - 1}")
    if b"\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL byte")
    return value + b"\0" * (size - len(value))


def _terminated(value: bytes, what: str) -> bytes:
    if b"\0" in value:
        raise LocalProtocolError(f"{what} contains a NUL byte")
    return value + b"\0"


@dataclass(frozen=True, slots=True)
class Header:
    """The 8-byte header: ``type`` and ``len``, both u32 little-endian."""

    type: int
    length: int

    def encode(self) -> bytes:
        return HEADER.pack(self.type, self.length)

    @classmethod
    def decode(cls, raw: bytes | bytearray | memoryview) -> Header:
        if len(raw) != HEADER_SIZE:
            raise RemoteProtocolError(f"header is {len(raw)} bytes, expected {HEADER_SIZE}")
        msg_type, length = HEADER.unpack(raw)
        return cls(msg_type, length)


@dataclass(frozen=True, slots=True)
class Hello:
    """MSG_HELLO: the sender's protocol version (peer_info)."""

    version: int

    def payload(self) -> bytes:
        return PEER_INFO.pack(self.version)

    msg_type = MsgType.HELLO


@dataclass(frozen=True, slots=True)
class ExecRequest:
    """MSG_EXEC_CMDLINE or MSG_JUST_EXEC with a command line (exec_params + cmdline).

    ``command`` excludes the terminating NUL, which the encoder adds.
    """

    msg_type: MsgType
    connect_domain: int
    connect_port: int
    command: bytes

    def payload(self) -> bytes:
        if self.msg_type not in EXEC_TYPES:
            raise LocalProtocolError(f"{self.msg_type!r} does not carry a command line")
        return EXEC_PARAMS.pack(self.connect_domain, self.connect_port) + _terminated(
            self.command, "command line"
        )


@dataclass(frozen=True, slots=True)
class ExecParams:
    """Bare exec_params (8 bytes) under some type.

    The daemon's reply to a client (same type as the request, its VM's domid and the
    allocated port) has this form; so has the record the agent writes, *without header*,
    to a qrexec-client-vm socket (see :meth:`payload`).
    """

    msg_type: MsgType
    connect_domain: int
    connect_port: int

    def payload(self) -> bytes:
        return EXEC_PARAMS.pack(self.connect_domain, self.connect_port)


@dataclass(frozen=True, slots=True)
class ServiceConnect:
    """MSG_SERVICE_CONNECT: exec_params + service_params (ident[32], raw)."""

    connect_domain: int
    connect_port: int
    ident: bytes

    msg_type = MsgType.SERVICE_CONNECT

    def payload(self) -> bytes:
        return EXEC_PARAMS.pack(self.connect_domain, self.connect_port) + _fixed(
            self.ident, IDENT_SIZE, "request id"
        )


@dataclass(frozen=True, slots=True)
class ServiceRefused:
    """MSG_SERVICE_REFUSED: the 32 ident bytes (raw).

    The daemon echoes the request id exactly as the agent sent it, even when it refuses
    it for being malformed (no NUL, bad bytes), so any 32-byte value is sent unchanged;
    a shorter value is NUL-padded.
    """

    ident: bytes

    msg_type = MsgType.SERVICE_REFUSED

    def payload(self) -> bytes:
        if len(self.ident) == IDENT_SIZE:
            return bytes(self.ident)
        return pad_field(self.ident, IDENT_SIZE, "request id")


@dataclass(frozen=True, slots=True)
class ConnectionTerminated:
    """MSG_CONNECTION_TERMINATED: exec_params without a command line."""

    connect_domain: int
    connect_port: int

    msg_type = MsgType.CONNECTION_TERMINATED

    def payload(self) -> bytes:
        return EXEC_PARAMS.pack(self.connect_domain, self.connect_port)


@dataclass(frozen=True, slots=True)
class TriggerService:
    """MSG_TRIGGER_SERVICE (v2): service_name[64], target_domain[32], request_id[32]."""

    service_name: bytes
    target_domain: bytes
    request_id: bytes

    msg_type = MsgType.TRIGGER_SERVICE

    def payload(self) -> bytes:
        return (
            _fixed(self.service_name, V2_SERVICE_NAME_SIZE, "service name")
            + _fixed(self.target_domain, V2_TARGET_DOMAIN_SIZE, "target domain")
            + _fixed(self.request_id, IDENT_SIZE, "request id")
        )


@dataclass(frozen=True, slots=True)
class TriggerService3:
    """MSG_TRIGGER_SERVICE3: target_domain[64], request_id[32], service name + NUL."""

    target_domain: bytes
    request_id: bytes
    service_name: bytes

    msg_type = MsgType.TRIGGER_SERVICE3

    def payload(self) -> bytes:
        return (
            _fixed(self.target_domain, V3_TARGET_DOMAIN_SIZE, "target domain")
            + _fixed(self.request_id, IDENT_SIZE, "request id")
            + _terminated(self.service_name, "service name")
        )


@dataclass(frozen=True, slots=True)
class TriggerService4:
    """MSG_TRIGGER_SERVICE4: source_domain[64], target_domain[64], request_id[32], name."""

    source_domain: bytes
    target_domain: bytes
    request_id: bytes
    service_name: bytes

    msg_type = MsgType.TRIGGER_SERVICE4

    def payload(self) -> bytes:
        return (
            _fixed(self.source_domain, V4_SOURCE_DOMAIN_SIZE, "source domain")
            + _fixed(self.target_domain, V3_TARGET_DOMAIN_SIZE, "target domain")
            + _fixed(self.request_id, IDENT_SIZE, "request id")
            + _terminated(self.service_name, "service name")
        )


@dataclass(frozen=True, slots=True)
class Data:
    """MSG_DATA_STDIN/STDOUT/STDERR; an empty payload is end-of-stream."""

    msg_type: MsgType
    data: bytes

    def payload(self) -> bytes:
        if self.msg_type not in DATA_TYPES:
            raise LocalProtocolError(f"{self.msg_type!r} is not a data stream type")
        return self.data

    @property
    def is_eof(self) -> bool:
        return not self.data


@dataclass(frozen=True, slots=True)
class ExitStatus:
    """MSG_DATA_EXIT_CODE: a signed 32-bit status. A short payload reads as 255 (§3.2)."""

    code: int

    msg_type = MsgType.DATA_EXIT_CODE

    def payload(self) -> bytes:
        return EXIT_CODE.pack(self.code)


@dataclass(frozen=True, slots=True)
class RawFrame:
    """Any message kept as its payload bytes, exactly as received (or to be sent).

    For receivers that must apply the peer's own rules to a layout our decoder would
    reject outright - the daemon's trigger checks of spec §15.2 (a name without its NUL is
    refused, not a framing error) - and for forwarding a message byte for byte (a client's
    SERVICE_CONNECT of any length, §15.3). ``encode`` sends ``raw`` unchanged.
    """

    msg_type: MsgType
    raw: bytes

    def payload(self) -> bytes:
        return self.raw


Message = (
    Hello
    | ExecRequest
    | ExecParams
    | ServiceConnect
    | ServiceRefused
    | ConnectionTerminated
    | TriggerService
    | TriggerService3
    | TriggerService4
    | Data
    | ExitStatus
    | RawFrame
)


def _fixed(value: bytes, size: int, what: str) -> bytes:
    """Encode a fixed field: raw (already ``size`` bytes, as decoded) or padded."""
    if len(value) == size and value.endswith(b"\0"):
        return value
    return pad_field(value, size, what)


def encode(msg: Message) -> bytes:
    """Return the complete frame (header + payload) for ``msg``."""
    payload = msg.payload()
    return HEADER.pack(int(msg.msg_type), len(payload)) + payload


def _split_terminated(raw: bytes, what: str) -> bytes:
    """The variable trailing field: must end in NUL and hold no NUL before that."""
    if not raw.endswith(b"\0"):
        raise RemoteProtocolError(f"{what} is not NUL-terminated")
    body = raw[:-1]
    if b"\0" in body:
        raise RemoteProtocolError(f"{what} has a NUL byte before its terminator")
    return body


def decode_payload(msg_type: int, payload: bytes) -> Message:
    """Decode one payload whose header said ``msg_type``.

    Checks only what the layout itself demands (sizes, terminators of variable fields);
    raises :class:`RemoteProtocolError` otherwise.
    """
    try:
        kind = MsgType(msg_type)
    except ValueError:
        raise RemoteProtocolError(f"unknown message type 0x{msg_type:x}") from None
    size = len(payload)
    if kind in DATA_TYPES:
        return Data(kind, bytes(payload))
    if kind is MsgType.DATA_EXIT_CODE:
        if size < EXIT_CODE.size:
            return ExitStatus(255)
        return ExitStatus(EXIT_CODE.unpack_from(payload)[0])
    if kind is MsgType.HELLO:
        _expect(kind, size, PEER_INFO.size)
        return Hello(PEER_INFO.unpack(payload)[0])
    if kind in EXEC_TYPES:
        if size < EXEC_PARAMS.size:
            raise RemoteProtocolError(f"{kind.name} payload is {size} bytes, below 8")
        domain, port = EXEC_PARAMS.unpack_from(payload)
        if size == EXEC_PARAMS.size:
            return ExecParams(kind, domain, port)
        command = _split_terminated(bytes(payload[EXEC_PARAMS.size :]), "command line")
        return ExecRequest(kind, domain, port, command)
    if kind is MsgType.SERVICE_CONNECT:
        if size == EXEC_PARAMS.size:
            domain, port = EXEC_PARAMS.unpack(payload)
            return ExecParams(kind, domain, port)
        _expect(kind, size, EXEC_PARAMS.size + IDENT_SIZE)
        domain, port = EXEC_PARAMS.unpack_from(payload)
        return ServiceConnect(domain, port, bytes(payload[EXEC_PARAMS.size :]))
    if kind is MsgType.SERVICE_REFUSED:
        _expect(kind, size, IDENT_SIZE)
        return ServiceRefused(bytes(payload))
    if kind is MsgType.CONNECTION_TERMINATED:
        _expect(kind, size, EXEC_PARAMS.size)
        return ConnectionTerminated(*EXEC_PARAMS.unpack(payload))
    if kind is MsgType.TRIGGER_SERVICE:
        _expect(kind, size, TRIGGER_V2_SIZE)
        raw = bytes(payload)
        return TriggerService(
            raw[:V2_SERVICE_NAME_SIZE],
            raw[V2_SERVICE_NAME_SIZE : V2_SERVICE_NAME_SIZE + V2_TARGET_DOMAIN_SIZE],
            raw[V2_SERVICE_NAME_SIZE + V2_TARGET_DOMAIN_SIZE :],
        )
    if kind is MsgType.TRIGGER_SERVICE3:
        if size <= TRIGGER_V3_PREFIX:
            raise RemoteProtocolError(f"TRIGGER_SERVICE3 payload is {size} bytes, too short")
        raw = bytes(payload)
        return TriggerService3(
            raw[:V3_TARGET_DOMAIN_SIZE],
            raw[V3_TARGET_DOMAIN_SIZE:TRIGGER_V3_PREFIX],
            _split_terminated(raw[TRIGGER_V3_PREFIX:], "service name"),
        )
    # The only type left is TRIGGER_SERVICE4.
    if size <= TRIGGER_V4_PREFIX:
        raise RemoteProtocolError(f"TRIGGER_SERVICE4 payload is {size} bytes, too short")
    raw = bytes(payload)
    src_end = V4_SOURCE_DOMAIN_SIZE
    tgt_end = src_end + V3_TARGET_DOMAIN_SIZE
    return TriggerService4(
        raw[:src_end],
        raw[src_end:tgt_end],
        raw[tgt_end:TRIGGER_V4_PREFIX],
        _split_terminated(raw[TRIGGER_V4_PREFIX:], "service name"),
    )


def _expect(kind: MsgType, size: int, expected: int) -> None:
    if size != expected:
        raise RemoteProtocolError(f"{kind.name} payload is {size} bytes, expected {expected}")
