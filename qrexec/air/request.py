"""The pure parts of a relayed call: the transport argument and the request line.

``qubesair.SSHProxy`` receives ``REMOTE_TARGET+SERVICE+ARG`` as its service argument, split at
the first two ``+`` only (ARG may be empty or contain ``+``). It sends the peer one request
line, ``SOURCE TARGET SERVICE[+ARG]`` (three words), which the peer's forced command reads as
data — never through a shell. Both ends validate every word with the rules below; anything
else is refused with :class:`AirRequestError`. Does no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from qrexec.errors import QrexecError

#: A qube name as it may cross hosts.
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]{1,31}$")
#: SERVICE+ARG as it may cross hosts (a service name cannot start with ``+``).
_SERVICE_RE = re.compile(r"^[A-Za-z0-9_.-][A-Za-z0-9_.+-]{0,254}$")
#: Longest request line accepted from a peer.
MAX_REQUEST_LEN = 512


class AirRequestError(QrexecError):
    """A transport argument or a request line is malformed; the message says which part."""


def check_name(value: str, what: str) -> str:
    """A qube name: ``[A-Za-z0-9_.-]``, 1 to 31 characters, not ``.`` or ``..``."""
    if not _NAME_RE.match(value) or value in (".", ".."):
        raise AirRequestError(f"invalid {what} {value!r}")
    return value


def check_service(value: str) -> str:
    """SERVICE[+ARG]: ``[A-Za-z0-9_.+-]``, not starting with ``+``."""
    if not _SERVICE_RE.match(value):
        raise AirRequestError(f"invalid service {value!r}")
    return value


def host_key_alias(host: str) -> str:
    """The name a host's key is pinned under in every peer's known_hosts (``HostKeyAlias``)."""
    return f"qubes-air-{host}"


@dataclass(frozen=True)
class TransportArgument:
    """``REMOTE_TARGET+SERVICE+ARG`` as the relay's transport service receives it."""

    remote_target: str
    service: str
    argument: str

    @property
    def service_call(self) -> str:
        """``SERVICE+ARG`` (``SERVICE+`` when ARG is empty, as qrexec itself forwards it)."""
        return f"{self.service}+{self.argument}"


def split_transport_argument(text: str) -> TransportArgument:
    """Split at the first two ``+`` only; the rest, ``+`` included, is ARG."""
    target, plus, rest = text.partition("+")
    if not plus:
        raise AirRequestError(f"transport argument {text!r} has no service")
    service, _, argument = rest.partition("+")
    check_name(target, "remote target")
    if not service:
        raise AirRequestError(f"transport argument {text!r} has an empty service")
    check_service(f"{service}+{argument}")
    return TransportArgument(target, service, argument)


@dataclass(frozen=True)
class RelayRequest:
    """What one host's relay asks the other's: who calls, whom, and what."""

    source: str
    target: str
    service_call: str

    def line(self) -> str:
        """The request line sent to the peer (its ``SSH_ORIGINAL_COMMAND``)."""
        return f"{self.source} {self.target} {self.service_call}"


def parse_request_line(text: str) -> RelayRequest:
    """Read a peer's request line: exactly three words, each checked."""
    if len(text) > MAX_REQUEST_LEN:
        raise AirRequestError(f"request line of {len(text)} bytes is too long")
    words = text.split(" ")
    if len(words) != 3:
        raise AirRequestError(f"request line {text!r} is not 'SOURCE TARGET SERVICE[+ARG]'")
    source, target, service_call = words
    return RelayRequest(
        check_name(source, "source"), check_name(target, "target"), check_service(service_call)
    )
