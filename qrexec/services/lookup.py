"""Finding a qrexec service on disk and deciding what kind it is (spec §7).

Lookup: every directory of the service path is searched for ``SERVICE+ARG`` and only then
every directory for ``SERVICE`` (names from
:func:`~qrexec.protocol.cmdline.service_lookup_names`); the first entry that exists
decides. A symlink to ``/dev/tcp…`` is taken as it is; any other symlink is followed, and
a dangling one counts as absent (the search goes on). An ``lstat``/``stat`` error other
than ENOENT fails the call (exit 125); nothing found is exit 127 (spec §7). rpc-config
files are looked up the same way.

Kinds of service file:

* an executable (run with execve, ``argv[1]`` = ARG when non-empty);
* a unix socket (the agent connects and relays; no stderr);
* a symlink to ``/dev/tcp/HOST/PORT``, ``/dev/tcp/HOST`` (port from ARG) or ``/dev/tcp``
  (ARG is ``HOST+PORT``, ``+`` standing for ``:`` in the host); numeric hosts only;
* in the 2011 directory ``/etc/qubes_rpc`` — and only there — a one-line text file that
  names the program to run (the seed's ``/etc/qubes_rpc/test.Add`` holds
  ``/usr/bin/our_test_add_server``). A file there that is executable and starts with
  ``#!`` or an ELF header is an ordinary executable.

Every absolute path (service path entries, rpc-config path entries, the program named by
a 2011 file) is resolved inside the domain's root folder (:class:`DomainRoot`), so that
emulated domains on one host never share a service tree. The root ``/`` is a real domain.

Used by the agent and by ``qrexec-client`` for dom0-local services: blocking, imports no
asyncio. Does not run anything.
"""

from __future__ import annotations

import enum
import errno
import os
import shlex
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from qrexec.errors import InvalidField, ServiceError, ServiceNotFound
from qrexec.protocol.cmdline import ServiceName, service_lookup_names
from qrexec.services.rpc_config import RpcConfig, load_rpc_config

SERVICE_PATH_ENV = "QREXEC_SERVICE_PATH"
RPC_CONFIG_PATH_ENV = "QUBES_RPC_CONFIG_PATH"
DOMAIN_ROOT_ENV = "QREXEC_DOMAIN_ROOT"
#: The 2011 directory, where one-line "program name" files are allowed.
LEGACY_2011_DIR = "/etc/qubes_rpc"
DEFAULT_SERVICE_PATH = (
    "/run/qubes-rpc",
    "/usr/local/etc/qubes-rpc",
    "/etc/qubes-rpc",
    LEGACY_2011_DIR,
)
DEFAULT_RPC_CONFIG_PATH = (
    "/run/qubes/rpc-config",
    "/usr/local/etc/qubes/rpc-config",
    "/etc/qubes/rpc-config",
)
#: A 2011 one-line file longer than this is not a program name.
MAX_ONE_LINE_FILE = 4096
_TCP_PREFIX = "/dev/tcp"


@dataclass(frozen=True, slots=True)
class DomainRoot:
    """The folder that stands for ``/`` of one (emulated) domain."""

    root: str = "/"

    @classmethod
    def from_env(cls, explicit: str | None, env: Mapping[str, str]) -> DomainRoot:
        """``--domain-root`` wins, then ``QREXEC_DOMAIN_ROOT``, else the real ``/``."""
        chosen = explicit or env.get(DOMAIN_ROOT_ENV) or "/"
        return cls(os.path.abspath(chosen))

    @property
    def is_real(self) -> bool:
        return self.root == "/"

    def resolve(self, path: str) -> str:
        """The host path of ``path`` as the domain sees it (relative paths stay as given)."""
        if self.is_real or not os.path.isabs(path):
            return path
        return os.path.join(self.root, path.lstrip("/"))

    def home_of(self, user: str) -> str:
        """``<root>/home/<user>`` (only meaningful for an emulated root)."""
        return os.path.join(self.root, "home", user)


def search_path(env: Mapping[str, str], variable: str, default: Sequence[str]) -> list[str]:
    """The directories of a colon-separated path variable; a set variable is the full list."""
    raw = env.get(variable)
    if raw is None:
        return list(default)
    return [entry for entry in raw.split(":") if entry]


class ServiceKind(enum.Enum):
    EXECUTABLE = "executable"
    SOCKET = "socket"
    TCP = "tcp"


@dataclass(frozen=True, slots=True)
class ServiceTarget:
    """What a service name resolved to.

    ``path`` is the host path of the file found; ``argv`` the program and arguments for
    executables (ARG already appended when non-empty); ``tcp`` the (host, port) of a
    ``/dev/tcp`` service; ``file_name`` the name matched (``SERVICE+ARG`` or ``SERVICE``),
    which is also the name its rpc-config is looked up by.
    """

    kind: ServiceKind
    path: str
    file_name: str
    argv: tuple[str, ...] = ()
    tcp: tuple[str, int] | None = None


def _check_safe_name(name: ServiceName) -> None:
    """Refuse names that could escape the service directories."""
    for part in (name.service, name.arg):
        if "/" in part or "\0" in part:
            raise ServiceError(f"service name {name.full_name[:80]!r} contains '/' or NUL")
    if name.service in ("", ".", ".."):
        raise ServiceError(f"service name {name.service!r} is not a file name")


def find_service(
    name: ServiceName, directories: Sequence[str], root: DomainRoot = DomainRoot()
) -> ServiceTarget:
    """Look ``name`` up along ``directories`` (as the domain sees them) and classify it.

    Raises :class:`ServiceNotFound` (127) or :class:`ServiceError` (125).
    """
    _check_safe_name(name)
    try:
        file_names = service_lookup_names(name)
    except InvalidField as exc:
        raise ServiceNotFound(str(exc)) from None
    for file_name in file_names:
        for directory in directories:
            path = os.path.join(root.resolve(directory), file_name)
            info = _lookup_entry(path, "service file")
            if info is None:
                continue
            legacy = os.path.normpath(directory) == LEGACY_2011_DIR
            return _classify(path, file_name, info, name, root, legacy=legacy)
    raise ServiceNotFound(f"service {name.full_name!r} not found on {':'.join(directories)}")


def find_config(
    name: ServiceName, directories: Sequence[str], root: DomainRoot = DomainRoot()
) -> str | None:
    """The rpc-config file for ``name`` (same lookup order as services), or None."""
    _check_safe_name(name)
    try:
        file_names = service_lookup_names(name)
    except InvalidField:
        return None
    for file_name in file_names:
        for directory in directories:
            path = os.path.join(root.resolve(directory), file_name)
            if _lookup_entry(path, "rpc-config") is not None:
                return path
    return None


def _is_tcp_link(link: str) -> bool:
    return link == _TCP_PREFIX or link.startswith(_TCP_PREFIX + "/")


def _lookup_entry(path: str, what: str) -> os.stat_result | None:
    """The lstat of one lookup candidate; None when absent (a dangling symlink is absent).

    A symlink to ``/dev/tcp…`` is returned as the link itself (it is never followed).
    Any error other than ENOENT is a ServiceError (125).
    """
    try:
        info = os.lstat(path)
        if not stat.S_ISLNK(info.st_mode) or _is_tcp_link(os.readlink(path)):
            return info
        os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ServiceError(f"cannot look up {what} {path}: {exc}") from None
    return info


def find_service_in_env(
    name: ServiceName, env: Mapping[str, str], root: DomainRoot
) -> tuple[ServiceTarget, RpcConfig]:
    """``name`` and its rpc-config on the search paths ``env`` sets (or the defaults): how
    dom0 finds the services it runs itself (``qrexec-client -d dom0``, VM → dom0 calls)."""
    target = find_service(name, search_path(env, SERVICE_PATH_ENV, DEFAULT_SERVICE_PATH), root)
    config_path = find_config(
        name, search_path(env, RPC_CONFIG_PATH_ENV, DEFAULT_RPC_CONFIG_PATH), root
    )
    return target, load_rpc_config(config_path)


def _classify(
    path: str,
    file_name: str,
    info: os.stat_result,
    name: ServiceName,
    root: DomainRoot,
    *,
    legacy: bool,
) -> ServiceTarget:
    if stat.S_ISLNK(info.st_mode):
        link = os.readlink(path)
        if _is_tcp_link(link):
            return ServiceTarget(
                ServiceKind.TCP, path, file_name, tcp=parse_tcp_target(link, name.arg)
            )
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ServiceError(f"service symlink {path} is unusable: {exc}") from None
    if stat.S_ISSOCK(info.st_mode):
        return ServiceTarget(ServiceKind.SOCKET, path, file_name)
    if legacy and stat.S_ISREG(info.st_mode) and not _is_program(path, info):
        program = read_one_line_program(path, root)
        argv = (*program, name.arg) if name.arg else program
        return ServiceTarget(ServiceKind.EXECUTABLE, path, file_name, argv=argv)
    argv = (path, name.arg) if name.arg else (path,)
    return ServiceTarget(ServiceKind.EXECUTABLE, path, file_name, argv=argv)


def _is_program(path: str, info: os.stat_result) -> bool:
    """An executable script or binary (as opposed to a 2011 one-line program name)."""
    if not info.st_mode & (stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH):
        return False
    try:
        with open(path, "rb") as file:
            magic = file.read(4)
    except OSError:
        return True  # let execution report the real problem
    return magic.startswith(b"#!") or magic == b"\x7fELF"


def read_one_line_program(path: str, root: DomainRoot) -> tuple[str, ...]:
    """The program (and fixed arguments) named by a 2011 service file, inside ``root``."""
    try:
        with open(path, "rb") as file:
            content = file.read(MAX_ONE_LINE_FILE + 1)
    except OSError as exc:
        raise ServiceError(f"cannot read service file {path}: {exc}") from None
    if len(content) > MAX_ONE_LINE_FILE:
        raise ServiceError(f"2011 service file {path} is longer than {MAX_ONE_LINE_FILE} bytes")
    lines = [line for line in content.decode("utf-8", "surrogateescape").splitlines() if line]
    if len(lines) != 1:
        raise ServiceError(f"2011 service file {path} must hold exactly one line")
    try:
        words = shlex.split(lines[0])
    except ValueError as exc:
        raise ServiceError(f"2011 service file {path}: {exc}") from None
    if not words:
        raise ServiceError(f"2011 service file {path} names no program")
    return (root.resolve(words[0]), *words[1:])


def parse_tcp_target(link: str, argument: str) -> tuple[str, int]:
    """(host, port) of a ``/dev/tcp`` symlink service; ServiceError (125) otherwise.

    Forms (spec §7, §15.6): ``/dev/tcp/HOST/PORT`` (ARG must be empty),
    ``/dev/tcp/HOST`` (the port is ARG, which must not be empty) and ``/dev/tcp`` (ARG
    is ``HOST+PORT``: the port follows the last ``+``, earlier ``+`` stand for ``:``,
    and a ``_`` in the host is refused). The port is 1-65535 in decimal without a
    leading zero; the host is numeric only, IPv6 when it holds ``:`` or ``%``.
    """
    if link == _TCP_PREFIX:
        if not argument:
            raise ServiceError("/dev/tcp service called without HOST+PORT argument")
        host_part, plus, port_text = argument.rpartition("+")
        if not plus:
            raise ServiceError(f"/dev/tcp service argument {argument!r} has no port")
        host = host_part.replace("+", ":")
        if "_" in host:
            raise ServiceError(f"/dev/tcp host {host!r} contains '_'")
    else:
        parts = link[len(_TCP_PREFIX) + 1 :].split("/")
        if parts == [""] or len(parts) > 2:
            raise ServiceError(f"malformed /dev/tcp symlink {link!r}")
        host = parts[0]
        if len(parts) == 2:
            if argument:
                raise ServiceError(f"{link} takes no argument, got {argument!r}")
            port_text = parts[1]
        else:
            if not argument:
                raise ServiceError(f"{link} needs the port as argument")
            port_text = argument
    return _numeric_host(host), _port_number(port_text)


def _port_number(text: str) -> int:
    if not (text.isascii() and text.isdigit()) or text.startswith("0") or int(text) > 65535:
        raise ServiceError(f"/dev/tcp port {text[:32]!r} is not a port number")
    return int(text)


def _numeric_host(host: str) -> str:
    """The numeric address ``host`` stands for, as connect() takes it."""
    import socket

    family = socket.AF_INET6 if ":" in host or "%" in host else socket.AF_INET
    try:
        info = socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0, socket.AI_NUMERICHOST)
    except (OSError, UnicodeError, ValueError):
        raise ServiceError(f"/dev/tcp host {host[:64]!r} is not a numeric address") from None
    return str(info[0][4][0])


def is_missing_path_error(exc: OSError) -> bool:
    """Whether an exec failure means "no such program" rather than "cannot run it"."""
    return exc.errno in (errno.ENOENT, errno.ENOTDIR)
