"""Command-line strings carried by EXEC_CMDLINE and JUST_EXEC (spec §3.6, §7).

Forms handled:

- ``USER:[nogui:]COMMAND``: split at the first ``:``; a ``nogui:`` right after it is a flag.
- ``QUBESRPC SERVICE[+ARG] SOURCE``: a service call to a VM (single spaces).
- ``QUBESRPC SERVICE[+ARG] SOURCE TYPE TARGET``: dom0's internal form; TYPE is ``name``
  or ``keyword``, TARGET the requested target without its leading ``@``.

Also the helpers around them: ``DEFAULT:`` user substitution, SERVICE/ARG splitting (a
missing ``+ARG`` is an empty argument, but whether ``+`` was present is kept because the
service environment depends on it), the service descriptor sent to socket services, and
the NAME_MAX rule for service file lookup.

Command lines are ``str``; :func:`decode_cmdline` maps wire bytes to ``str`` with
``surrogateescape`` so arbitrary bytes of a shell command survive a round trip
(``os.fsencode`` gives them back). Malformed input raises
:class:`~qrexec.errors.RemoteProtocolError`; bad arguments to the builders raise
:class:`~qrexec.errors.LocalProtocolError`. Does no I/O.
"""

from __future__ import annotations

from qrexec.errors import InvalidField, LocalProtocolError, RemoteProtocolError
from qrexec.protocol.constants import MAX_SERVICE_FILE_NAME

TYPE_CHECKING = False  # typing is not imported at run time: the clients load this module
if TYPE_CHECKING:
    from dataclasses import dataclass
    from typing import Final
else:
    from qrexec._record import dataclass

RPC_PREFIX: Final = "QUBESRPC "
NOGUI_PREFIX: Final = "nogui:"
DEFAULT_USER_TOKEN: Final = "DEFAULT"
TARGET_TYPES: Final = ("name", "keyword")


def decode_cmdline(raw: bytes) -> str:
    """Wire bytes of a command line (without its NUL) to ``str``, losslessly."""
    return raw.decode("utf-8", "surrogateescape")


def encode_cmdline(text: str) -> bytes:
    """The inverse of :func:`decode_cmdline` (the NUL terminator is the encoder's job)."""
    return text.encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class UserCommand:
    """``USER:[nogui:]COMMAND`` split into its parts."""

    user: str
    command: str
    nogui: bool = False

    def build(self) -> str:
        return build_user_command(self.user, self.command, nogui=self.nogui)

    @property
    def is_rpc(self) -> bool:
        """True for a ``QUBESRPC`` service call, False for a shell command."""
        return is_rpc_command(self.command)


def parse_user_command(cmdline: str) -> UserCommand:
    """Split ``USER:[nogui:]COMMAND`` at the first ``:`` (the agent's rule)."""
    user, colon, rest = cmdline.partition(":")
    if not colon:
        raise RemoteProtocolError(f"command line {cmdline[:64]!r} has no 'USER:' part")
    if not user:
        raise RemoteProtocolError("command line has an empty user name")
    if rest.startswith(NOGUI_PREFIX):
        return UserCommand(user, rest[len(NOGUI_PREFIX) :], nogui=True)
    return UserCommand(user, rest)


def build_user_command(user: str, command: str, *, nogui: bool = False) -> str:
    """``USER:[nogui:]COMMAND``; the user may not be empty or hold ``:``."""
    if not user or ":" in user:
        raise LocalProtocolError(f"user name {user!r} is empty or contains ':'")
    return f"{user}:{NOGUI_PREFIX if nogui else ''}{command}"


def replace_default_user(cmdline: str, default_user: str) -> str:
    """The daemon's ``DEFAULT:`` substitution (for EXEC_CMDLINE/JUST_EXEC only)."""
    prefix = DEFAULT_USER_TOKEN + ":"
    if cmdline.startswith(prefix):
        return build_user_command(default_user, cmdline[len(prefix) :])
    return cmdline


def is_rpc_command(command: str) -> bool:
    """Whether COMMAND (after ``USER:``) is a ``QUBESRPC`` service call."""
    return command.startswith(RPC_PREFIX)


@dataclass(frozen=True, slots=True)
class ServiceName:
    """``SERVICE[+ARG]``. ``argument`` is None when there was no ``+`` at all."""

    service: str
    argument: str | None = None

    @property
    def arg(self) -> str:
        """The argument, '' when missing (a missing ``+ARG`` is an empty argument)."""
        return self.argument or ""

    @property
    def full_name(self) -> str:
        """As given: ``SERVICE``, ``SERVICE+`` or ``SERVICE+ARG``."""
        return self.service if self.argument is None else f"{self.service}+{self.argument}"

    @property
    def with_plus(self) -> str:
        """Always ``SERVICE+ARG`` (what VM → VM calls carry and what lookup tries first)."""
        return f"{self.service}+{self.arg}"


def split_service_name(name: str) -> ServiceName:
    """Split ``SERVICE[+ARG]`` at the first ``+``."""
    service, plus, argument = name.partition("+")
    return ServiceName(service, argument if plus else None)


def service_lookup_names(name: ServiceName) -> tuple[str, ...]:
    """File names to look up, in order: ``SERVICE+ARG`` then ``SERVICE`` (spec §7).

    ``SERVICE+ARG`` is skipped when longer than NAME_MAX (255). A SERVICE part itself
    longer than that can never be a file: :class:`InvalidField` (the call fails).
    """
    if len(name.service.encode("utf-8", "surrogateescape")) > MAX_SERVICE_FILE_NAME:
        raise InvalidField("service name", f"longer than {MAX_SERVICE_FILE_NAME} bytes")
    full = name.with_plus
    if len(full.encode("utf-8", "surrogateescape")) > MAX_SERVICE_FILE_NAME:
        return (name.service,)
    return (full, name.service)


def requested_target_fields(target: str) -> tuple[str, str]:
    """dom0's (TYPE, TARGET) pair: ``@x`` is ('keyword', 'x'), anything else ('name', it)."""
    if target.startswith("@"):
        return "keyword", target[1:]
    return "name", target


@dataclass(frozen=True, slots=True)
class RpcCall:
    """``QUBESRPC SERVICE[+ARG] SOURCE [TYPE TARGET]``.

    ``target_type``/``target`` are set only in dom0's form (the requested target with
    its ``@`` removed; TYPE says whether it was a keyword).
    """

    name: ServiceName
    source: str
    target_type: str | None = None
    target: str | None = None

    def build(self) -> str:
        return build_rpc_command(
            self.name.full_name, self.source, target_type=self.target_type, target=self.target
        )

    @property
    def descriptor(self) -> bytes:
        """The service descriptor for socket services: the text after ``QUBESRPC `` + NUL."""
        return encode_cmdline(self.build()[len(RPC_PREFIX) :]) + b"\0"


def parse_rpc_command(command: str) -> RpcCall:
    """Parse ``QUBESRPC SERVICE[+ARG] SOURCE`` or dom0's five-word form."""
    if not is_rpc_command(command):
        raise RemoteProtocolError(f"{command[:64]!r} is not a QUBESRPC call")
    words = command[len(RPC_PREFIX) :].split(" ")
    if len(words) == 2:
        name, source = words
        target_type = target = None
    elif len(words) == 4:
        name, source, target_type, target = words
        if target_type not in TARGET_TYPES:
            raise RemoteProtocolError(
                f"QUBESRPC target type {target_type[:32]!r} is not 'name' or 'keyword'"
            )
    else:
        raise RemoteProtocolError(
            f"QUBESRPC call has {len(words)} words after the prefix; expected 2 or 4"
        )
    if not name or name.startswith("+"):
        raise RemoteProtocolError(f"QUBESRPC service name {name[:64]!r} is empty")
    if not source:
        raise RemoteProtocolError("QUBESRPC call has an empty source domain")
    return RpcCall(split_service_name(name), source, target_type, target)


def build_rpc_command(
    name: str, source: str, *, target_type: str | None = None, target: str | None = None
) -> str:
    """``QUBESRPC NAME SOURCE`` or, with both ``target_type`` and ``target``, dom0's form."""
    for what, word in (("service name", name), ("source", source)):
        if not word or " " in word:
            raise LocalProtocolError(f"{what} {word!r} is empty or contains a space")
    if name.startswith("+"):
        raise LocalProtocolError(f"service name {name!r} starts with '+'")
    if (target_type is None) != (target is None):
        raise LocalProtocolError("target_type and target go together")
    if target_type is None or target is None:
        return f"{RPC_PREFIX}{name} {source}"
    if target_type not in TARGET_TYPES:
        raise LocalProtocolError(f"target type {target_type!r} is not 'name' or 'keyword'")
    if " " in target:
        raise LocalProtocolError(f"target {target!r} contains a space")
    return f"{RPC_PREFIX}{name} {source} {target_type} {target}"
