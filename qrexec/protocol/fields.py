"""Validation of untrusted string fields (spec §3.3, §3.6, §13), and trigger conversions.

What is **sanitised** (each offending byte becomes ``_``, the request goes on):

- target and source domain names: anything outside ``[A-Za-z0-9_.-@:]``;
- service names (``SERVICE`` or ``SERVICE+ARG``): anything outside ``[A-Za-z0-9_.-+]``;
- a fixed-size domain or v2 service-name field with no NUL at all: its last byte is taken
  as the terminator (upstream's daemon overwrites it with NUL), so the value is the first
  ``size - 1`` bytes.

What is **refused** (:class:`~qrexec.errors.InvalidField`; the daemon answers
MSG_SERVICE_REFUSED, echoing the raw ident, and asks no policy):

- a request ident holding a byte outside ``[A-Za-z0-9_.- ]`` before its NUL, with no NUL
  at all, or with any non-zero byte after the NUL;
- an empty service name, or one starting with ``+`` (checked after sanitising).

A variable service name without its NUL terminator or with a NUL inside is a layout
violation for :mod:`.messages` (RemoteProtocolError), but R4.3's daemon refuses such a
request and keeps the agent (spec §15.2): the daemon receives triggers undecoded and
judges them with :func:`validate_trigger_frame`, which refuses them. Wrong sizes stay
framing errors (:mod:`.framing`).

Values are decoded to ``str``: sanitised names are pure ASCII by construction, so no
decoding error is possible. Does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

from qrexec.errors import InvalidField
from qrexec.protocol.constants import (
    IDENT_SIZE,
    MAX_DOMAIN_ID,
    MAX_VCHAN_PORT,
    PROTOCOL_V3,
    PROTOCOL_V4,
    V2_SERVICE_NAME_SIZE,
    V2_TARGET_DOMAIN_SIZE,
    V3_TARGET_DOMAIN_SIZE,
    V4_SOURCE_DOMAIN_SIZE,
    MsgType,
)
from qrexec.protocol.messages import (
    TRIGGER_V3_PREFIX,
    TRIGGER_V4_PREFIX,
    RawFrame,
    TriggerService,
    TriggerService3,
    TriggerService4,
)

_ALNUM: Final = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
IDENT_CHARS: Final = frozenset(_ALNUM + b"_.- ")
DOMAIN_NAME_CHARS: Final = frozenset(_ALNUM + b"_.-@:")
SERVICE_NAME_CHARS: Final = frozenset(_ALNUM + b"_.-+")

Trigger = TriggerService | TriggerService3 | TriggerService4


def validate_connect_params(domain: int, port: int) -> tuple[int, int]:
    """Range-check the ``{domain, port}`` of EXEC_CMDLINE / JUST_EXEC / SERVICE_CONNECT.

    The wire carries two uint32; only 0..MAX_DOMAIN_ID and 0..MAX_VCHAN_PORT can name a
    vchan. Checked where the message is decoded, so that a transport never sees (and
    never raises about) a value no domain can have.
    """
    if not 0 <= domain <= MAX_DOMAIN_ID:
        raise InvalidField("domain id", f"{domain} is outside 0..{MAX_DOMAIN_ID}")
    if not 0 <= port <= MAX_VCHAN_PORT:
        raise InvalidField("vchan port", f"{port} is outside 0..{MAX_VCHAN_PORT}")
    return domain, port


def _translation(keep: frozenset[int]) -> bytes:
    return bytes(byte if byte in keep else ord("_") for byte in range(256))


_DOMAIN_TABLE: Final = _translation(DOMAIN_NAME_CHARS)
_SERVICE_TABLE: Final = _translation(SERVICE_NAME_CHARS)


def fixed_field_value(raw: bytes, size: int | None = None) -> bytes:
    """The value of a fixed NUL-padded field: the bytes before the first NUL.

    A field with no NUL at all loses its last byte, which upstream's daemon forces to NUL
    before reading the field (so a 64-byte field yields at most 63 bytes). With ``size``
    given, a NUL-free value shorter than the field is an unpadded value built locally and
    is returned whole.
    """
    end = raw.find(b"\0")
    if end >= 0:
        return raw[:end]
    if size is not None and len(raw) < size:
        return raw
    return raw[:-1]


def _value(raw: bytes) -> bytes:
    """Bytes up to the first NUL, or all of them (variable fields are NUL-free)."""
    end = raw.find(b"\0")
    return raw if end < 0 else raw[:end]


def sanitize_domain_name(raw: bytes) -> str:
    """A target or source domain name with every byte outside ``[A-Za-z0-9_.-@:]`` as ``_``.

    ``raw`` is read up to its first NUL (pass :func:`fixed_field_value` output for a fixed
    field that may lack one).
    """
    return _value(raw).translate(_DOMAIN_TABLE).decode("ascii")


def sanitize_service_name(raw: bytes) -> str:
    """A service name with every byte outside ``[A-Za-z0-9_.-+]`` as ``_`` (never refuses)."""
    return _value(raw).translate(_SERVICE_TABLE).decode("ascii")


def validate_service_name(raw: bytes) -> str:
    """Sanitise a service name, then refuse it when empty or starting with ``+``."""
    name = sanitize_service_name(raw)
    if not name:
        raise InvalidField("service name", "is empty")
    if name.startswith("+"):
        raise InvalidField("service name", f"{name[:64]!r} has no service before '+'")
    return name


def validate_ident(raw: bytes) -> str:
    """Check a request id field (ident[32]) as upstream's daemon does; return its value.

    Only ``[A-Za-z0-9_.- ]`` before the terminating NUL, and only zeros after it. Raises
    :class:`InvalidField` carrying the raw bytes (to echo in MSG_SERVICE_REFUSED).
    """
    if len(raw) > IDENT_SIZE:
        raise InvalidField("request id", f"is {len(raw)} bytes, above {IDENT_SIZE}", ident=raw)
    if len(raw) < IDENT_SIZE:
        # An unpadded value built locally: the field it stands for is NUL-padded.
        raw = raw + b"\0" * (IDENT_SIZE - len(raw))
    for offset, byte in enumerate(raw):
        if byte == 0:
            trailing = raw[offset + 1 :]
            if trailing.strip(b"\0"):
                bad = offset + 1 + next(i for i, b in enumerate(trailing) if b)
                raise InvalidField(
                    "request id",
                    f"non-NUL byte at offset {bad} after the terminator at offset {offset}",
                    ident=raw,
                )
            return raw[:offset].decode("ascii")
        if byte not in IDENT_CHARS:
            raise InvalidField(
                "request id", f"forbidden byte 0x{byte:02x} at offset {offset}", ident=raw
            )
    raise InvalidField("request id", "has no NUL terminator", ident=raw)


@dataclass(frozen=True, slots=True)
class TriggerRequest:
    """A VM-initiated call after validation and sanitising, as the daemon uses it.

    ``source`` is the v4 "source qube" ('' when absent, always '' for v2/v3). ``ident`` is
    the validated request id; ``raw_ident`` the 32 bytes to echo in SERVICE_CONNECT or
    SERVICE_REFUSED.
    """

    msg_type: MsgType
    service: str
    target: str
    source: str
    ident: str
    raw_ident: bytes


def validate_trigger(message: Trigger) -> TriggerRequest:
    """Validate and sanitise any trigger message (v2, v3 or v4).

    Raises :class:`InvalidField` (with ``ident`` set to the raw request id) when the
    request must be refused.
    """
    raw_ident = message.request_id
    try:
        ident = validate_ident(raw_ident)
        if isinstance(message, TriggerService):
            service = validate_service_name(
                fixed_field_value(message.service_name, V2_SERVICE_NAME_SIZE)
            )
        else:
            service = validate_service_name(message.service_name)
    except InvalidField as exc:
        raise InvalidField(exc.field, exc.reason, ident=raw_ident) from None
    target_size = (
        V2_TARGET_DOMAIN_SIZE if isinstance(message, TriggerService) else V3_TARGET_DOMAIN_SIZE
    )
    source = ""
    if isinstance(message, TriggerService4):
        source = sanitize_domain_name(
            fixed_field_value(message.source_domain, V4_SOURCE_DOMAIN_SIZE)
        )
    return TriggerRequest(
        msg_type=message.msg_type,
        service=service,
        target=sanitize_domain_name(fixed_field_value(message.target_domain, target_size)),
        source=source,
        ident=ident,
        raw_ident=raw_ident,
    )


def _raw_service_name(tail: bytes) -> bytes:
    """The service name of a v3/v4 trigger's variable tail, as R4.3's daemon judges it
    (spec §15.2): the last byte must be NUL and no NUL may come before it; otherwise the
    request is refused (InvalidField), never a framing error."""
    if not tail.endswith(b"\0"):
        raise InvalidField("service name", "is not NUL-terminated")
    body = tail[:-1]
    if b"\0" in body:
        raise InvalidField("service name", f"has a NUL at offset {body.index(0)}")
    return body


def validate_trigger_frame(frame: RawFrame | Trigger) -> TriggerRequest:
    """:func:`validate_trigger` for a trigger received undecoded (spec §15.2).

    A :class:`RawFrame` of TRIGGER_SERVICE3/4 (the header already length-checked) is split
    into its fixed fields and its name tail; the tail's NUL rules refuse the request
    (InvalidField carrying the 32 request-id bytes as received) instead of dropping the
    peer. Then the same checks as :func:`validate_trigger`: the request id, an empty name
    or a leading ``+`` refuse; name, target and source are sanitised.
    """
    if not isinstance(frame, RawFrame):
        return validate_trigger(frame)
    raw = frame.raw
    if frame.msg_type is MsgType.TRIGGER_SERVICE3:
        prefix, ident_at = TRIGGER_V3_PREFIX, V3_TARGET_DOMAIN_SIZE
    elif frame.msg_type is MsgType.TRIGGER_SERVICE4:
        prefix, ident_at = TRIGGER_V4_PREFIX, V4_SOURCE_DOMAIN_SIZE + V3_TARGET_DOMAIN_SIZE
    else:
        raise InvalidField("trigger", f"{frame.msg_type.name} is not a raw trigger type")
    raw_ident = raw[ident_at:prefix]
    try:
        name = _raw_service_name(raw[prefix:])
    except InvalidField as exc:
        raise InvalidField(exc.field, exc.reason, ident=raw_ident) from None
    fixed = raw[:ident_at]
    if frame.msg_type is MsgType.TRIGGER_SERVICE3:
        message: Trigger = TriggerService3(fixed, raw_ident, name)
    else:
        message = TriggerService4(
            fixed[:V4_SOURCE_DOMAIN_SIZE], fixed[V4_SOURCE_DOMAIN_SIZE:], raw_ident, name
        )
    return validate_trigger(message)


def _parts(message: Trigger) -> tuple[bytes, bytes, bytes, bytes]:
    """(source, target, request id, service name) values, NUL padding removed."""
    if isinstance(message, TriggerService):
        return (
            b"",
            fixed_field_value(message.target_domain, V2_TARGET_DOMAIN_SIZE),
            fixed_field_value(message.request_id, IDENT_SIZE),
            fixed_field_value(message.service_name, V2_SERVICE_NAME_SIZE),
        )
    source = b""
    if isinstance(message, TriggerService4):
        source = fixed_field_value(message.source_domain, V4_SOURCE_DOMAIN_SIZE)
    return (
        source,
        fixed_field_value(message.target_domain, V3_TARGET_DOMAIN_SIZE),
        fixed_field_value(message.request_id, IDENT_SIZE),
        message.service_name,
    )


def trigger_to_v3(message: Trigger) -> TriggerService3:
    """Convert for a v3 daemon: TRIGGER_SERVICE4 loses its source_domain; a v2 message
    (from an old qrexec-client-vm) is widened into the v3 layout.

    Like every converter here, it rebuilds fixed fields from their values (as
    :func:`fixed_field_value` reads them), so the result always encodes. The request id
    is normally overwritten by the agent (``SOCKET<fd>``) anyway.
    """
    _, target, ident, service = _parts(message)
    return TriggerService3(target_domain=target, request_id=ident, service_name=service)


def trigger_to_v4(message: Trigger) -> TriggerService4:
    """Convert for a v4 daemon: older layouts get an empty source_domain."""
    source, target, ident, service = _parts(message)
    return TriggerService4(
        source_domain=source, target_domain=target, request_id=ident, service_name=service
    )


def _fit(value: bytes, size: int, what: str, ident: bytes) -> bytes:
    if len(value) >= size:
        raise InvalidField(
            what,
            f"is {len(value)} bytes; protocol version 2 holds at most {size - 1}",
            ident=ident,
        )
    return value + b"\0" * (size - len(value))


def trigger_to_v2(message: Trigger) -> TriggerService:
    """Convert for a v2 daemon into the fixed 128-byte MSG_TRIGGER_SERVICE.

    The service name must fit in 63 bytes and the target in 31; otherwise the request
    cannot be expressed and :class:`InvalidField` is raised (the agent refuses it). A v4
    source_domain is dropped, as for v3.
    """
    _, target, ident, service = _parts(message)
    raw_ident = message.request_id
    return TriggerService(
        service_name=_fit(service, V2_SERVICE_NAME_SIZE, "service name", raw_ident),
        target_domain=_fit(target, V2_TARGET_DOMAIN_SIZE, "target domain", raw_ident),
        request_id=_fit(ident, IDENT_SIZE, "request id", raw_ident),
    )


def convert_trigger(message: Trigger, version: int) -> Trigger:
    """The trigger type a daemon speaking ``version`` accepts (see
    :func:`~qrexec.protocol.negotiation.trigger_type_for_version`), converted from any
    layout. Raises :class:`InvalidField` when going down to v2 does not fit.
    """
    if version >= PROTOCOL_V4:
        return trigger_to_v4(message)
    if version == PROTOCOL_V3:
        return trigger_to_v3(message)
    return trigger_to_v2(message)
