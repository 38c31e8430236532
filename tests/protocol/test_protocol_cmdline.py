"""Command-line strings: USER:[nogui:]COMMAND, QUBESRPC forms, service names (§3.6, §7)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from qrexec.errors import InvalidField, LocalProtocolError, RemoteProtocolError
from qrexec.protocol.cmdline import (
    RpcCall,
    ServiceName,
    UserCommand,
    build_rpc_command,
    build_user_command,
    decode_cmdline,
    encode_cmdline,
    is_rpc_command,
    parse_rpc_command,
    parse_user_command,
    replace_default_user,
    requested_target_fields,
    service_lookup_names,
    split_service_name,
)


@pytest.mark.parametrize(
    ("line", "user", "command", "nogui"),
    [
        ("user:id -u", "user", "id -u", False),
        ("root:nogui:true", "root", "true", True),
        ("user:echo a:b:c", "user", "echo a:b:c", False),  # split at the FIRST ':'
        ("user:", "user", "", False),
        ("user:nogui:", "user", "", True),
        ("user:nogui", "user", "nogui", False),  # no ':' after nogui: not the flag
        ("user:QUBESRPC qubes.Foo+ vm1", "user", "QUBESRPC qubes.Foo+ vm1", False),
        ("DEFAULT:nogui:QUBESRPC a b", "DEFAULT", "QUBESRPC a b", True),
    ],
)
def test_parse_user_command(line: str, user: str, command: str, nogui: bool) -> None:
    parsed = parse_user_command(line)
    assert parsed == UserCommand(user, command, nogui)
    assert parsed.build() == line


@pytest.mark.parametrize("line", ["no colon at all", "", ":cmd"])
def test_parse_user_command_refuses(line: str) -> None:
    with pytest.raises(RemoteProtocolError):
        parse_user_command(line)


@pytest.mark.parametrize("user", ["", "a:b"])
def test_build_user_command_refuses_bad_users(user: str) -> None:
    with pytest.raises(LocalProtocolError):
        build_user_command(user, "true")


@pytest.mark.parametrize(
    ("line", "default", "expected"),
    [
        ("DEFAULT:id", "user", "user:id"),
        ("DEFAULT:nogui:QUBESRPC a+ dom0", "alice", "alice:nogui:QUBESRPC a+ dom0"),
        ("root:id", "user", "root:id"),
        ("DEFAULTX:id", "user", "DEFAULTX:id"),
        ("default:id", "user", "default:id"),
    ],
)
def test_replace_default_user(line: str, default: str, expected: str) -> None:
    assert replace_default_user(line, default) == expected


@pytest.mark.parametrize(
    ("command", "is_rpc"),
    [("QUBESRPC a b", True), ("QUBESRPCa b", False), ("qubesrpc a b", False), ("ls", False)],
)
def test_is_rpc_command(command: str, is_rpc: bool) -> None:
    assert is_rpc_command(command) is is_rpc
    assert UserCommand("u", command).is_rpc is is_rpc


@pytest.mark.parametrize(
    ("name", "service", "argument", "arg", "with_plus"),
    [
        ("qubes.Foo", "qubes.Foo", None, "", "qubes.Foo+"),
        ("qubes.Foo+", "qubes.Foo", "", "", "qubes.Foo+"),
        ("qubes.Foo+bar", "qubes.Foo", "bar", "bar", "qubes.Foo+bar"),
        ("a+b+c", "a", "b+c", "b+c", "a+b+c"),
    ],
)
def test_split_service_name(
    name: str, service: str, argument: str | None, arg: str, with_plus: str
) -> None:
    split = split_service_name(name)
    assert split == ServiceName(service, argument)
    assert split.arg == arg
    assert split.full_name == name
    assert split.with_plus == with_plus


def test_parse_vm_rpc_command() -> None:
    call = parse_rpc_command("QUBESRPC qubes.Filecopy+ work")
    assert call == RpcCall(ServiceName("qubes.Filecopy", ""), "work")
    assert call.target_type is None and call.target is None
    assert call.build() == "QUBESRPC qubes.Filecopy+ work"
    assert call.descriptor == b"qubes.Filecopy+ work\0"


def test_parse_vm_rpc_command_without_plus() -> None:
    call = parse_rpc_command("QUBESRPC qubes.Foo work")
    assert call.name.argument is None and call.name.arg == ""
    assert call.build() == "QUBESRPC qubes.Foo work"


@pytest.mark.parametrize(
    ("line", "target_type", "target"),
    [
        ("QUBESRPC qubes.Foo+x vm1 name dom0", "name", "dom0"),
        ("QUBESRPC qubes.Foo+x vm1 keyword adminvm", "keyword", "adminvm"),
        ("QUBESRPC qubes.Foo+x vm1 keyword default", "keyword", "default"),
        ("QUBESRPC qubes.Foo+x vm1 name uuid:00000000-0000-0000-0000-000000000000", "name",
         "uuid:00000000-0000-0000-0000-000000000000"),
    ],
)  # fmt: skip
def test_parse_dom0_rpc_command(line: str, target_type: str, target: str) -> None:
    call = parse_rpc_command(line)
    assert call.name == ServiceName("qubes.Foo", "x")
    assert call.source == "vm1"
    assert (call.target_type, call.target) == (target_type, target)
    assert call.build() == line
    assert call.descriptor == line.removeprefix("QUBESRPC ").encode() + b"\0"


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("QUBESRPC", "not a QUBESRPC call"),
        ("ls -l", "not a QUBESRPC call"),
        ("QUBESRPC svc", "1 words"),
        ("QUBESRPC svc src name", "3 words"),
        ("QUBESRPC svc src name t extra", "5 words"),
        ("QUBESRPC  svc src", "3 words"),  # single spaces only
        ("QUBESRPC svc src other t", "not 'name' or 'keyword'"),
        ("QUBESRPC +arg src", "empty"),
        ("QUBESRPC svc ", "empty source"),
    ],
)
def test_parse_rpc_command_refuses(line: str, match: str) -> None:
    with pytest.raises(RemoteProtocolError, match=match):
        parse_rpc_command(line)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "a b", "source": "vm"}, "service name"),
        ({"name": "", "source": "vm"}, "service name"),
        ({"name": "+x", "source": "vm"}, "starts with"),
        ({"name": "a", "source": ""}, "source"),
        ({"name": "a", "source": "vm", "target_type": "name"}, "go together"),
        ({"name": "a", "source": "vm", "target_type": "bogus", "target": "x"}, "bogus"),
        ({"name": "a", "source": "vm", "target_type": "name", "target": "x y"}, "space"),
    ],
)
def test_build_rpc_command_refuses(kwargs: dict[str, str], match: str) -> None:
    with pytest.raises(LocalProtocolError, match=match):
        build_rpc_command(**kwargs)


@pytest.mark.parametrize(
    ("target", "fields"),
    [
        ("@default", ("keyword", "default")),
        ("@dispvm:fedora-dvm", ("keyword", "dispvm:fedora-dvm")),
        ("@adminvm", ("keyword", "adminvm")),
        ("vm2", ("name", "vm2")),
        ("dom0", ("name", "dom0")),
    ],
)
def test_requested_target_fields(target: str, fields: tuple[str, str]) -> None:
    assert requested_target_fields(target) == fields


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        (ServiceName("qubes.Foo", "bar"), ("qubes.Foo+bar", "qubes.Foo")),
        (ServiceName("qubes.Foo", None), ("qubes.Foo+", "qubes.Foo")),
        (ServiceName("qubes.Foo", ""), ("qubes.Foo+", "qubes.Foo")),
        (ServiceName("s" * 200, "a" * 54), ("s" * 200 + "+" + "a" * 54, "s" * 200)),  # 255
        (ServiceName("s" * 200, "a" * 55), ("s" * 200,)),  # 256: plain SERVICE only
        (ServiceName("s" * 255, None), ("s" * 255,)),
    ],
)
def test_service_lookup_names_name_max(name: ServiceName, expected: tuple[str, ...]) -> None:
    assert service_lookup_names(name) == expected


def test_service_part_longer_than_name_max_fails() -> None:
    with pytest.raises(InvalidField, match="longer than 255"):
        service_lookup_names(ServiceName("s" * 256, None))


@given(st.binary(max_size=200).map(lambda b: b.replace(b"\0", b"")))
def test_cmdline_bytes_round_trip(raw: bytes) -> None:
    assert encode_cmdline(decode_cmdline(raw)) == raw
