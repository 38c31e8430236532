"""The §6.1 response (policy → qrexec-daemon) codec, from hand-written bytes."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec.errors import LocalProtocolError, RemoteProtocolError
from qrexec.policy.decision.wire import DENY, PolicyResponse, allow_response, parse_response

ALLOW_VM = (
    b"result=allow\n"
    b"user=DEFAULT\n"
    b"target=personal\n"
    b"target_uuid=uuid:8e4c3e7a-1c2b-4f5e-9a6b-0c1d2e3f4a5b\n"
    b"autostart=True\n"
    b"requested_target=personal\n"
)


def test_allow_for_a_vm() -> None:
    r = parse_response(ALLOW_VM)
    assert r == PolicyResponse(
        result="allow",
        user="DEFAULT",
        target="personal",
        target_uuid="uuid:8e4c3e7a-1c2b-4f5e-9a6b-0c1d2e3f4a5b",
        autostart=True,
        requested_target="personal",
    )
    assert r.allowed


def test_trailing_newline_is_optional() -> None:
    assert parse_response(ALLOW_VM[:-1]) == parse_response(ALLOW_VM)


def test_deny_alone() -> None:
    assert parse_response(b"result=deny") == DENY
    assert parse_response(b"result=deny\n") == DENY
    assert not DENY.allowed


def test_unknown_keys_are_ignored_but_must_be_key_value() -> None:
    r = parse_response(b"result=deny\nfuture_key=whatever value\n")
    assert r == DENY
    with pytest.raises(RemoteProtocolError, match="not key=value"):
        parse_response(b"result=deny\nno equals sign\n")


def test_relay_fields_are_kept() -> None:
    r = parse_response(
        ALLOW_VM + b"service=qubesair.SSHProxy+remote+qubes.Filecopy+\npolicy_source=other\n"
    )
    assert r.service == "qubesair.SSHProxy+remote+qubes.Filecopy+"
    assert r.policy_source == "other"


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", "empty response"),
        (b"\n", "empty response"),
        (b"result=deny\n\n", "not key=value"),
        (b"user=u\ntarget=t\n", "lacks result"),
        (b"result=maybe\n", "allow or deny"),
        (b"result=deny\nresult=deny\n", "duplicate"),
        (ALLOW_VM + b"target=other\n", "duplicate"),
        (b"result=deny\nx=1\nx=2\n", "duplicate"),
        (b"result=deny\nuser=u\n", "must not carry user"),
        (b"result=deny\ntarget=t\nautostart=True\n", "must not carry autostart, target"),
        (b"result=allow\nuser=u\ntarget=t\nautostart=True\n", "lacks requested_target"),
        (b"result=allow\ntarget=t\nrequested_target=t\nautostart=False\n", "lacks user"),
        (b"result=allow\nuser=u\ntarget=t\nrequested_target=t\n", "lacks autostart"),
        (ALLOW_VM.replace(b"True", b"yes"), "True or False"),
        (b"result=deny\x00\n", "NUL"),
        (b"result=deny\nx=\xff\n", "not ASCII"),
        (b"result=deny\n" + b"x" * 4096, "longer than 4096"),
        (ALLOW_VM.replace(b"user=DEFAULT", b"user="), "user: empty"),
        (ALLOW_VM.replace(b"user=DEFAULT", b"user=root:evil"), "contains ':'"),
    ],
)
def test_bad_responses(data: bytes, reason: str) -> None:
    with pytest.raises(RemoteProtocolError, match=reason):
        parse_response(data)


def test_exactly_4096_bytes_is_accepted() -> None:
    data = b"result=deny\npad=" + b"x" * (4096 - 16 - 1) + b"\n"
    assert len(data) == 4096
    assert parse_response(data) == DENY


def test_allow_shapes() -> None:
    dom0 = allow_response(
        target="dom0", target_uuid=None, user=None, autostart=True, requested_target="@adminvm"
    )
    assert dom0.encode() == (
        b"result=allow\nuser=DEFAULT\ntarget=dom0\nautostart=True\nrequested_target=@adminvm\n"
    )
    vm = allow_response(
        target="work", target_uuid="1234", user="root", autostart=False, requested_target=""
    )
    assert vm.encode() == (
        b"result=allow\nuser=root\ntarget=work\ntarget_uuid=uuid:1234\n"
        b"autostart=False\nrequested_target=@default\n"
    )
    disp = allow_response(
        target="@dispvm:dvm",
        target_uuid="uuid:abcd",
        user=None,
        autostart=True,
        requested_target="@dispvm",
    )
    assert b"target=@dispvm:dvm\ntarget_uuid=@dispvm:uuid:abcd\n" in disp.encode()
    assert DENY.encode() == b"result=deny\n"
    assert DENY.lines() == ["result=deny"]


def test_allow_shape_errors() -> None:
    with pytest.raises(LocalProtocolError, match="no target_uuid"):
        allow_response(
            target="dom0", target_uuid="x", user=None, autostart=True, requested_target="dom0"
        )
    no_uuid = allow_response(
        target="vm", target_uuid=None, user=None, autostart=True, requested_target="vm"
    )
    assert no_uuid.target_uuid is None
    with pytest.raises(LocalProtocolError, match="must not carry target_uuid"):
        PolicyResponse(result="deny", target_uuid="uuid:x").encode()
    with pytest.raises(LocalProtocolError, match="lacks"):
        PolicyResponse(result="allow", target="x").encode()
    with pytest.raises(LocalProtocolError, match="contains ':'"):
        allow_response(
            target="vm", target_uuid=None, user="a:b", autostart=True, requested_target="vm"
        ).encode()


_value = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)


@given(
    target=_value,
    uuid=_value,
    user=_value.filter(lambda u: ":" not in u),
    autostart=st.booleans(),
    requested=_value,
    service=st.one_of(st.none(), _value),
)
def test_allow_round_trip(
    target: str, uuid: str, user: str, autostart: bool, requested: str, service: str | None
) -> None:
    r = PolicyResponse("allow", user, target, uuid, autostart, requested, service)
    assert parse_response(r.encode()) == r
