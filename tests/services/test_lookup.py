"""Service lookup and rpc-config parsing of the agent (spec §7), on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qrexec.errors import ServiceError, ServiceNotFound
from qrexec.protocol.cmdline import split_service_name
from qrexec.services.lookup import (
    DomainRoot,
    ServiceKind,
    find_config,
    find_service,
    parse_tcp_target,
    search_path,
)
from qrexec.services.rpc_config import RpcConfig, load_rpc_config, parse_rpc_config

PATH = ["/run/qubes-rpc", "/etc/qubes-rpc", "/etc/qubes_rpc"]


def put(root: Path, relative: str, text: str = "#!/bin/sh\n", mode: int = 0o755) -> Path:
    path = root / relative.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(mode)
    return path


def find(root: Path, name: str):  # type: ignore[no-untyped-def]
    return find_service(split_service_name(name), PATH, DomainRoot(str(root)))


def test_service_plus_argument_in_any_directory_beats_plain_service(tmp_path: Path) -> None:
    put(tmp_path, "/run/qubes-rpc/svc")
    special = put(tmp_path, "/etc/qubes-rpc/svc+arg")
    target = find(tmp_path, "svc+arg")
    assert (target.path, target.file_name, target.argv) == (
        str(special),
        "svc+arg",
        (str(special), "arg"),
    )
    generic = find(tmp_path, "svc+other")
    assert generic.file_name == "svc"
    assert generic.argv == (str(tmp_path / "run/qubes-rpc/svc"), "other")


def test_first_directory_wins_and_missing_argument_looks_for_plus(tmp_path: Path) -> None:
    first = put(tmp_path, "/run/qubes-rpc/svc")
    put(tmp_path, "/etc/qubes-rpc/svc")
    assert find(tmp_path, "svc").path == str(first)
    plus = put(tmp_path, "/etc/qubes-rpc/other+")
    assert find(tmp_path, "other").path == str(plus)


def test_not_found_and_lstat_errors(tmp_path: Path) -> None:
    with pytest.raises(ServiceNotFound):
        find(tmp_path, "nothing+here")
    # A path entry that is a file makes lstat fail with ENOTDIR, which fails the call.
    put(tmp_path, "/run/qubes-rpc", "not a folder")
    with pytest.raises(ServiceError) as info:
        find(tmp_path, "svc")
    assert not isinstance(info.value, ServiceNotFound)


def test_names_that_could_escape_are_refused(tmp_path: Path) -> None:
    for name in ("../etc+x", "a+b/c", ".."):
        with pytest.raises(ServiceError):
            find(tmp_path, name)


def test_overlong_service_plus_argument_looks_up_only_the_service(tmp_path: Path) -> None:
    put(tmp_path, "/etc/qubes-rpc/svc")
    target = find(tmp_path, "svc+" + "a" * 300)
    assert target.file_name == "svc"


def test_2011_one_line_file_names_a_program_inside_the_root(tmp_path: Path) -> None:
    put(tmp_path, "/etc/qubes_rpc/test.Add", "/usr/bin/our_test_add_server\n", 0o644)
    target = find(tmp_path, "test.Add")
    assert target.kind is ServiceKind.EXECUTABLE
    assert target.argv == (str(tmp_path / "usr/bin/our_test_add_server"),)
    with_args = put(tmp_path, "/etc/qubes_rpc/test.Args", "/bin/prog --flag 'two words'\n", 0o644)
    assert find(tmp_path, "test.Args+x").argv == (
        str(tmp_path / "bin/prog"),
        "--flag",
        "two words",
        "x",
    )
    assert with_args.exists()


def test_2011_scripts_stay_scripts_and_other_dirs_never_read_one_liners(tmp_path: Path) -> None:
    script = put(tmp_path, "/etc/qubes_rpc/test.Script", "#!/bin/sh\necho hi\n")
    assert find(tmp_path, "test.Script").argv == (str(script),)
    one_liner = put(tmp_path, "/etc/qubes-rpc/test.Line", "/usr/bin/prog\n", 0o644)
    assert find(tmp_path, "test.Line").argv == (str(one_liner),)


def test_bad_2011_files_fail_the_call(tmp_path: Path) -> None:
    put(tmp_path, "/etc/qubes_rpc/two", "/a\n/b\n", 0o644)
    put(tmp_path, "/etc/qubes_rpc/empty", "\n", 0o644)
    put(tmp_path, "/etc/qubes_rpc/quote", "/a 'unterminated\n", 0o644)
    for name in ("two", "empty", "quote"):
        with pytest.raises(ServiceError):
            find(tmp_path, name)


def test_socket_and_tcp_services(tmp_path: Path) -> None:
    import socket

    folder = tmp_path / "run/qubes-rpc"
    folder.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(folder / "sock.Svc"))  # short path: tmp_path of a short test name
        assert find(tmp_path, "sock.Svc").kind is ServiceKind.SOCKET
    os.symlink("/dev/tcp/127.0.0.1/8080", folder / "tcp.Full")
    os.symlink("/dev/tcp/::1", folder / "tcp.Host")
    os.symlink("/dev/tcp", folder / "tcp.Bare")
    assert find(tmp_path, "tcp.Full").tcp == ("127.0.0.1", 8080)
    assert find(tmp_path, "tcp.Full+").tcp == ("127.0.0.1", 8080)
    assert find(tmp_path, "tcp.Host+22").tcp == ("::1", 22)
    assert find(tmp_path, "tcp.Bare+127.0.0.1+443").tcp == ("127.0.0.1", 443)
    assert find(tmp_path, "tcp.Bare+++1+443").tcp == ("::1", 443)


@pytest.mark.parametrize(
    ("link", "arg"),
    [
        ("/dev/tcp/localhost/80", ""),
        ("/dev/tcp/127.0.0.1", "notaport"),
        ("/dev/tcp/127.0.0.1", "70000"),
        ("/dev/tcp", "noport"),
        ("/dev/tcp/1/2/3", ""),
        # Spec §15.6, every /dev/tcp error case:
        ("/dev/tcp/", ""),  # a symlink to /dev/tcp/
        ("/dev/tcp/", "127.0.0.1+22"),
        ("/dev/tcp", ""),  # missing host
        ("/dev/tcp", "127.0.0.1"),  # missing port
        ("/dev/tcp", "1_2+22"),  # `_` in the host
        ("/dev/tcp", "+22"),  # empty host
        ("/dev/tcp/127.0.0.1", ""),  # /dev/tcp/HOST without ARG
        ("/dev/tcp/::1", ""),
        ("/dev/tcp/127.0.0.1/22", "x"),  # /dev/tcp/HOST/PORT with an ARG
        ("/dev/tcp/127.0.0.1", "0"),
        ("/dev/tcp/127.0.0.1", "022"),  # leading zero
        ("/dev/tcp/127.0.0.1", "65536"),
        ("/dev/tcp/127.0.0.1", "-1"),
        ("/dev/tcp/127.0.0.1", "+22"),
        ("/dev/tcp/127.0.0.1/", ""),
        ("/dev/tcp/example.org/22", ""),  # not numeric
        ("/dev/tcp/1.2.3.4%x/22", ""),  # `%` forces IPv6
        ("/dev/tcp/::1%no-such-if/22", ""),
    ],
)
def test_bad_tcp_targets(link: str, arg: str) -> None:
    with pytest.raises(ServiceError):
        parse_tcp_target(link, arg)


@pytest.mark.parametrize(
    ("link", "arg", "expected"),
    [
        ("/dev/tcp", "++1+22", ("::1", 22)),  # earlier `+` are `:`, port after the last
        ("/dev/tcp", "127.0.0.1+65535", ("127.0.0.1", 65535)),
        ("/dev/tcp/127.0.0.1", "1", ("127.0.0.1", 1)),
        ("/dev/tcp/::1/22", "", ("::1", 22)),
    ],
)
def test_good_tcp_targets(link: str, arg: str, expected: tuple[str, int]) -> None:
    assert parse_tcp_target(link, arg) == expected


def test_dangling_symlinks_count_as_absent(tmp_path: Path) -> None:
    # Spec §7: a dangling symlink is skipped and the search goes on.
    run = tmp_path / "run/qubes-rpc"
    run.mkdir(parents=True)
    os.symlink("/nonexistent/target", run / "svc+arg")
    os.symlink("/nonexistent/target", run / "svc")
    plain = put(tmp_path, "/etc/qubes-rpc/svc")
    target = find(tmp_path, "svc+arg")
    assert target.path == str(plain) and target.file_name == "svc"
    os.symlink("/nonexistent/target", run / "gone")
    with pytest.raises(ServiceNotFound):
        find(tmp_path, "gone")


def test_symlink_stat_errors_fail_the_call(tmp_path: Path) -> None:
    run = tmp_path / "run/qubes-rpc"
    run.mkdir(parents=True)
    os.symlink("/dev/null/x", run / "svc")  # ENOTDIR, not ENOENT
    put(tmp_path, "/etc/qubes-rpc/svc")
    with pytest.raises(ServiceError) as info:
        find(tmp_path, "svc")
    assert not isinstance(info.value, ServiceNotFound)


def test_dangling_config_symlink_is_absent(tmp_path: Path) -> None:
    root = DomainRoot(str(tmp_path))
    first = tmp_path / "run/qubes/rpc-config"
    first.mkdir(parents=True)
    os.symlink("/nonexistent", first / "svc")
    later = put(tmp_path, "/etc/qubes/rpc-config/svc", "wait-for-session = 1\n", 0o644)
    dirs = ["/run/qubes/rpc-config", "/etc/qubes/rpc-config"]
    assert find_config(split_service_name("svc"), dirs, root) == str(later)
    os.symlink("/dev/null/x", first / "bad")
    with pytest.raises(ServiceError):
        find_config(split_service_name("bad"), dirs, root)


def test_config_lookup_and_search_path() -> None:
    assert search_path({}, "X", ("/a", "/b")) == ["/a", "/b"]
    assert search_path({"X": "/c::/d"}, "X", ("/a",)) == ["/c", "/d"]
    assert search_path({"X": ""}, "X", ("/a",)) == []


def test_config_is_found_like_services(tmp_path: Path) -> None:
    put(tmp_path, "/etc/qubes/rpc-config/svc", "wait-for-session = 1\n", 0o644)
    put(tmp_path, "/etc/qubes/rpc-config/svc+special", "skip-service-descriptor = true\n", 0o644)
    root = DomainRoot(str(tmp_path))
    dirs = ["/etc/qubes/rpc-config"]
    assert load_rpc_config(find_config(split_service_name("svc+x"), dirs, root)) == RpcConfig(
        wait_for_session=True
    )
    special = load_rpc_config(find_config(split_service_name("svc+special"), dirs, root))
    assert special.skip_service_descriptor and not special.wait_for_session
    assert find_config(split_service_name("none"), dirs, root) is None


def test_rpc_config_keys_and_errors() -> None:
    config = parse_rpc_config(
        "# comment\nwait-for-session = true\nforce-user = 'bob'\nunknown-key = 3\n"
    )
    assert config == RpcConfig(wait_for_session=True, force_user="bob")
    sockets = parse_rpc_config(
        "skip-service-descriptor = true\nexit-on-client-eof = true\nexit-on-service-eof = false\n"
    )
    assert sockets.exit_on_client_eof and sockets.skip_service_descriptor
    for bad in (
        "wait-for-session = 2",
        "skip-service-descriptor = 1",
        "force-user = ''",
        "force-user = 'a'\nexit-on-client-eof = true",
        "wait-for-session = ",
        "exit-on-service-eof = 'yes'",
    ):
        with pytest.raises(ServiceError):
            parse_rpc_config(bad, "cfg")
