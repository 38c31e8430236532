"""Field validation tables: what is sanitised to '_' and what is refused (§3.6, §13)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec.errors import InvalidField, RemoteProtocolError
from qrexec.protocol.constants import MsgType
from qrexec.protocol.fields import (
    DOMAIN_NAME_CHARS,
    SERVICE_NAME_CHARS,
    convert_trigger,
    fixed_field_value,
    sanitize_domain_name,
    sanitize_service_name,
    trigger_to_v2,
    trigger_to_v3,
    trigger_to_v4,
    validate_ident,
    validate_service_name,
    validate_trigger,
)
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import (
    ServiceRefused,
    TriggerService,
    TriggerService3,
    TriggerService4,
    encode,
)


@pytest.mark.parametrize(
    ("raw", "value"),
    [
        (b"vm1\0\0\0\0\0", b"vm1"),
        (b"\0" * 8, b""),
        (b"a\0b\0\0\0\0\0", b"a"),  # up to the FIRST NUL; what follows is ignored
        (b"abcdefgh", b"abcdefg"),  # no NUL: upstream forces the last byte to NUL
    ],
)
def test_fixed_field_value(raw: bytes, value: bytes) -> None:
    assert fixed_field_value(raw) == value


def test_fixed_field_value_with_size_keeps_unpadded_values() -> None:
    assert fixed_field_value(b"vm1", 32) == b"vm1"
    assert fixed_field_value(b"x" * 32, 32) == b"x" * 31


# raw ident -> accepted value, or None for refused
IDENT_TABLE: list[tuple[bytes, str | None]] = [
    (b"SOCKET12" + bytes(24), "SOCKET12"),
    (b"a-b_c.d e" + bytes(23), "a-b_c.d e"),
    (bytes(32), ""),
    (b"X" * 31 + b"\0", "X" * 31),
    (b"SOCKET", "SOCKET"),  # a short, locally built value counts as padded
    (b"X" * 32, None),  # no NUL terminator
    (b"ok\0junk" + bytes(25), None),  # non-zero after the NUL
    (b"ok" + bytes(29) + b"\x01", None),  # non-zero in the last byte
    (b"semi;colon" + bytes(22), None),
    (b"slash/" + bytes(26), None),
    (b"tab\t" + bytes(28), None),
    (b"plus+" + bytes(27), None),
    (b"caf\xc3\xa9" + bytes(27), None),
    (b"X" * 33, None),  # longer than the field
]


@pytest.mark.parametrize(("raw", "expected"), IDENT_TABLE)
def test_validate_ident(raw: bytes, expected: str | None) -> None:
    if expected is None:
        with pytest.raises(InvalidField) as info:
            validate_ident(raw)
        assert info.value.field == "request id"
        assert info.value.ident == raw
        assert isinstance(info.value, RemoteProtocolError)
    else:
        assert validate_ident(raw) == expected


def test_ident_error_names_the_problem() -> None:
    with pytest.raises(InvalidField, match="forbidden byte 0x3b at offset 4"):
        validate_ident(b"semi;colon" + bytes(22))
    with pytest.raises(InvalidField, match="offset 3 after the terminator at offset 2"):
        validate_ident(b"ok\0junk" + bytes(25))
    with pytest.raises(InvalidField, match="no NUL terminator"):
        validate_ident(b"X" * 32)


DOMAIN_TABLE = [
    (b"work-vm_1.x", "work-vm_1.x"),
    (b"@dispvm:fedora-dvm", "@dispvm:fedora-dvm"),
    (b"uuid:0f1e2d3c-0000-4000-8000-000000000001", "uuid:0f1e2d3c-0000-4000-8000-000000000001"),
    (b"$dispvm", "_dispvm"),  # the client-vm rewrites $ to @; the daemon does not
    (b"vm 2", "vm_2"),
    (b"a/b", "a_b"),
    (b"a+b", "a_b"),
    (b"caf\xc3\xa9", "caf__"),  # each non-ASCII byte becomes one '_'
    (b"vm\0garbage", "vm"),
    (b"", ""),
]


@pytest.mark.parametrize(("raw", "expected"), DOMAIN_TABLE)
def test_sanitize_domain_name(raw: bytes, expected: str) -> None:
    assert sanitize_domain_name(raw) == expected


SERVICE_TABLE = [
    (b"qubes.Filecopy", "qubes.Filecopy"),
    (b"qubes.Gpg+arg-1_2.x", "qubes.Gpg+arg-1_2.x"),
    (b"svc+a+b", "svc+a+b"),
    (b"svc+", "svc+"),
    (b"svc+a/b", "svc+a_b"),
    (b"svc@x:y", "svc_x_y"),  # @ and : are for domains only
    (b"svc arg", "svc_arg"),
    (b"\xff", "_"),
]


@pytest.mark.parametrize(("raw", "expected"), SERVICE_TABLE)
def test_sanitize_service_name(raw: bytes, expected: str) -> None:
    assert sanitize_service_name(raw) == expected
    assert validate_service_name(raw) == expected


@pytest.mark.parametrize("raw", [b"", b"+arg", b"+", b"\0svc"])
def test_service_name_refused(raw: bytes) -> None:
    with pytest.raises(InvalidField, match="service name"):
        validate_service_name(raw)


@given(st.binary(max_size=100))
def test_sanitised_names_keep_only_allowed_characters(raw: bytes) -> None:
    domain = sanitize_domain_name(raw)
    service = sanitize_service_name(raw)
    value = raw.split(b"\0", 1)[0]
    assert len(domain) == len(value) == len(service)
    assert set(domain.encode()) <= DOMAIN_NAME_CHARS
    assert set(service.encode()) <= SERVICE_NAME_CHARS
    for original, d, s in zip(value, domain.encode(), service.encode(), strict=True):
        assert d == (original if original in DOMAIN_NAME_CHARS else ord("_"))
        assert s == (original if original in SERVICE_NAME_CHARS else ord("_"))


def _decode_one(frame: bytes, version: int) -> TriggerService | TriggerService3 | TriggerService4:
    (message,) = FrameDecoder(version).feed(frame)
    assert isinstance(message, TriggerService | TriggerService3 | TriggerService4)
    return message


def test_validate_trigger_v4_from_the_wire() -> None:
    frame = encode(TriggerService4(b"relay vm", b"$dispvm:dvm", b"SOCKET5", b"qubes.Foo+a/b"))
    request = validate_trigger(_decode_one(frame, 4))
    assert request.msg_type is MsgType.TRIGGER_SERVICE4
    assert request.service == "qubes.Foo+a_b"
    assert request.target == "_dispvm:dvm"
    assert request.source == "relay_vm"
    assert request.ident == "SOCKET5"
    assert request.raw_ident == b"SOCKET5" + bytes(25)


def test_validate_trigger_v2_fixed_fields_without_nul_are_truncated() -> None:
    """v2 fields are fixed: a NUL-free 64-byte name loses its last byte, as upstream."""
    payload = b"s" * 64 + b"t" * 32 + b"SOCKET1" + bytes(25)
    frame = b"\x10\x02\x00\x00\x80\x00\x00\x00" + payload
    request = validate_trigger(_decode_one(frame, 2))
    assert request.service == "s" * 63
    assert request.target == "t" * 31
    assert request.source == ""


def test_validate_trigger_v3_target_without_nul_is_truncated() -> None:
    payload = b"t" * 64 + b"id" + bytes(30) + b"svc\0"
    frame = b"\x12\x02\x00\x00" + len(payload).to_bytes(4, "little") + payload
    assert validate_trigger(_decode_one(frame, 3)).target == "t" * 63


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (TriggerService3(b"vm", b"bad/ident", b"svc"), "request id"),
        (TriggerService3(b"vm", b"SOCKET1", b"+arg"), "service name"),
        (TriggerService3(b"vm", b"SOCKET1", b""), "service name"),
        (TriggerService4(b"", b"vm", b"SOCKET1", b"+"), "service name"),
        (TriggerService(b"", b"vm", b"SOCKET1"), "service name"),
    ],
)
def test_validate_trigger_refusals_carry_the_raw_ident(
    message: TriggerService | TriggerService3 | TriggerService4, field: str
) -> None:
    decoded = _decode_one(encode(message), 4)
    with pytest.raises(InvalidField) as info:
        validate_trigger(decoded)
    assert info.value.field == field
    assert info.value.ident == decoded.request_id
    # The refusal can always be sent: the raw ident is echoed byte for byte.
    assert info.value.ident is not None
    assert encode(ServiceRefused(info.value.ident))[8:] == decoded.request_id


def test_bad_ident_without_nul_is_still_echoed() -> None:
    payload = b"vm" + bytes(62) + b"Z" * 32 + b"svc\0"
    frame = b"\x12\x02\x00\x00" + len(payload).to_bytes(4, "little") + payload
    with pytest.raises(InvalidField) as info:
        validate_trigger(_decode_one(frame, 3))
    assert info.value.ident == b"Z" * 32
    assert encode(ServiceRefused(b"Z" * 32)) == b"\x03\x02\x00\x00\x20\x00\x00\x00" + b"Z" * 32


def test_v4_to_v3_drops_source() -> None:
    v4 = _decode_one(encode(TriggerService4(b"src", b"vm2", b"SOCKET3", b"a+b")), 4)
    v3 = trigger_to_v3(v4)
    assert v3 == TriggerService3(b"vm2", b"SOCKET3", b"a+b")
    assert encode(v3) == encode(TriggerService3(b"vm2", b"SOCKET3", b"a+b"))
    assert convert_trigger(v4, 3) == v3


def test_conversions_normalise_nul_free_fixed_fields() -> None:
    """A client-vm may send a 64-byte target without NUL; the result must still encode."""
    v4 = TriggerService4(b"s" * 64, b"t" * 64, b"SOCKET3" + bytes(25), b"svc")
    v3 = trigger_to_v3(v4)
    assert v3.target_domain == b"t" * 63
    assert len(encode(v3)) == 8 + 96 + 4
    assert trigger_to_v4(v4).source_domain == b"s" * 63


def test_up_conversion_of_a_v2_message() -> None:
    v2 = _decode_one(encode(TriggerService(b"qubes.Foo", b"vm2", b"SOCKET")), 2)
    assert convert_trigger(v2, 4) == TriggerService4(b"", b"vm2", b"SOCKET", b"qubes.Foo")
    assert convert_trigger(v2, 3) == TriggerService3(b"vm2", b"SOCKET", b"qubes.Foo")
    assert encode(convert_trigger(v2, 2)) == encode(v2)


def test_down_conversion_to_v2_when_it_fits() -> None:
    v4 = TriggerService4(b"src", b"t" * 31, b"SOCKET", b"s" * 63)
    v2 = trigger_to_v2(v4)
    expected = b"s" * 63 + b"\0" + b"t" * 31 + b"\0" + b"SOCKET" + bytes(26)
    assert encode(v2) == b"\x10\x02\x00\x00\x80\x00\x00\x00" + expected
    assert convert_trigger(v4, 2) == v2


@pytest.mark.parametrize(
    ("message", "field"),
    [
        (TriggerService3(b"vm", b"SOCKET", b"s" * 64), "service name"),
        (TriggerService4(b"", b"t" * 32, b"SOCKET", b"svc"), "target domain"),
    ],
)
def test_down_conversion_to_v2_refuses_what_does_not_fit(
    message: TriggerService3 | TriggerService4, field: str
) -> None:
    with pytest.raises(InvalidField, match="holds at most") as info:
        trigger_to_v2(message)
    assert info.value.field == field
    assert info.value.ident == message.request_id


def test_convert_to_v4_keeps_v4() -> None:
    v4 = TriggerService4(b"src", b"vm", b"SOCKET", b"svc")
    assert convert_trigger(v4, 4) == v4
    assert convert_trigger(TriggerService3(b"vm", b"SOCKET", b"svc"), 4) == TriggerService4(
        b"", b"vm", b"SOCKET", b"svc"
    )
