"""The qrexec-daemon ↔ policy wire format of spec §6.1, both directions, both sides.

*Query* (qrexec-daemon → policy daemon): ASCII ``key=value`` lines ended by an empty line.
Keys: ``source``, ``requested_source`` (v4, optional, may be empty), ``intended_target``,
``service_and_arg``, and the Python-side extras ``assume_yes_for_ask`` and ``just_evaluate``
(``yes``/``no``). Unknown, duplicate or missing keys make the query invalid.

*Response* (policy → qrexec-daemon): ``key=value`` lines up to EOF, at most 4096 bytes, no
NUL, one trailing newline allowed. ``result=allow`` requires ``user``, ``target``,
``requested_target`` and ``autostart``; ``result=deny`` forbids them. Unknown keys are ignored
(forward compatibility, as the C daemon does); a duplicate key or a line without ``=`` makes
the response invalid.

Both encoders and both parsers live here so that the policy daemon, ``qrexec-policy-exec``
and our qrexec-daemon (which parses responses from either) share one definition. Values are
identifiers (qube names, ``@`` keywords, ``uuid:…``, ``SERVICE+ARG``): printable ASCII
without spaces; anything else is refused with an error naming the key.

Does no I/O. Errors: :class:`~qrexec.errors.RemoteProtocolError` for bytes we received,
:class:`~qrexec.errors.LocalProtocolError` for objects we were asked to encode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from qrexec.errors import LocalProtocolError, RemoteProtocolError

#: Upper bound for a whole query. The service name may be ~65000 bytes (spec §8,
#: qrexec-client-vm); the other values are short. Past this the sender is misbehaving.
MAX_QUERY_BYTES: Final = 65536 + 4096
#: The C qrexec-daemon reads at most this many bytes of a response (spec §6.1).
MAX_RESPONSE_BYTES: Final = 4096

QUERY_KEYS: Final = (
    "source",
    "requested_source",
    "intended_target",
    "service_and_arg",
    "assume_yes_for_ask",
    "just_evaluate",
)
REQUIRED_QUERY_KEYS: Final = frozenset({"source", "intended_target", "service_and_arg"})

RESPONSE_KEYS: Final = (
    "result",
    "user",
    "target",
    "target_uuid",
    "autostart",
    "requested_target",
    "service",
    "policy_source",
)
#: Keys an allow must carry and a deny must not (spec §6.1).
ALLOW_ONLY_KEYS: Final = frozenset({"user", "target", "requested_target", "autostart"})

Result = Literal["allow", "deny"]


def _check_value(key: str, value: str, *, allow_empty: bool, error: type[Exception]) -> None:
    """Values are identifiers: printable ASCII (0x21..0x7e), no spaces or controls."""
    if not value and not allow_empty:
        raise error(f"{key}: empty value")
    for ch in value:
        if not "!" <= ch <= "~":
            raise error(f"{key}: character {ch!r} is not allowed (printable ASCII only)")


def _check_user(value: str | None, error: type[Exception]) -> None:
    """The user goes in front of ``:`` in qrexec-daemon's ``USER:QUBESRPC …`` command line,
    so a ``:`` in it would let the rest be read as part of the command."""
    if value is not None and ":" in value:
        raise error(f"user: {value[:64]!r} contains ':'")


def _yes_no(key: str, value: str) -> bool:
    if value == "yes":
        return True
    if value == "no":
        return False
    raise RemoteProtocolError(f"{key}: expected yes or no, got {value!r}")


# --------------------------------------------------------------------------- query


@dataclass(frozen=True, slots=True)
class PolicyQuery:
    """One policy question, as qrexec-daemon asks it.

    ``requested_source`` is ``None`` when the line was absent (v2/v3 daemons, the exec
    fallback) and ``""`` when present but empty (v4 daemon, ordinary call).
    ``intended_target`` is the target exactly as the caller sent it (may be empty).
    """

    source: str
    intended_target: str
    service_and_arg: str
    requested_source: str | None = None
    assume_yes_for_ask: bool = False
    just_evaluate: bool = False

    @property
    def service(self) -> str:
        """The service name: ``service_and_arg`` up to the first ``+``."""
        return self.service_and_arg.partition("+")[0]

    @property
    def argument(self) -> str:
        """The argument with its leading ``+`` (just ``+`` when the call had none)."""
        _, plus, arg = self.service_and_arg.partition("+")
        return "+" + arg if plus else "+"

    def encode(self) -> bytes:
        """The query bytes, empty terminating line included."""
        fields: list[tuple[str, str]] = [("source", self.source)]
        if self.requested_source is not None:
            fields.append(("requested_source", self.requested_source))
        fields += [
            ("intended_target", self.intended_target),
            ("service_and_arg", self.service_and_arg),
        ]
        if self.assume_yes_for_ask:
            fields.append(("assume_yes_for_ask", "yes"))
        if self.just_evaluate:
            fields.append(("just_evaluate", "yes"))
        for key, value in fields:
            _check_value(
                key,
                value,
                allow_empty=key in ("requested_source", "intended_target"),
                error=LocalProtocolError,
            )
        data = "".join(f"{k}={v}\n" for k, v in fields) + "\n"
        if len(data) > MAX_QUERY_BYTES:
            raise LocalProtocolError(f"query is {len(data)} bytes; the cap is {MAX_QUERY_BYTES}")
        return data.encode("ascii")


def parse_query(data: bytes) -> PolicyQuery:
    """Parse one complete query: the lines *and* the terminating empty line.

    ``data`` must end exactly at the terminator (use :class:`QueryDecoder` to find it in
    a stream).
    """
    if len(data) > MAX_QUERY_BYTES:
        raise RemoteProtocolError(f"query is {len(data)} bytes; the cap is {MAX_QUERY_BYTES}")
    if not data.endswith(b"\n") or (data != b"\n" and not data.endswith(b"\n\n")):
        raise RemoteProtocolError("query does not end with an empty line")
    if b"\0" in data:
        raise RemoteProtocolError("query contains a NUL byte")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"query is not ASCII (byte {exc.start})") from None
    body = text[:-2] if text != "\n" else ""
    values: dict[str, str] = {}
    for lineno, line in enumerate(body.split("\n") if body else [], start=1):
        key, eq, value = line.partition("=")
        if not eq:
            raise RemoteProtocolError(f"query line {lineno} is not key=value: {line[:64]!r}")
        if key not in QUERY_KEYS:
            raise RemoteProtocolError(f"query line {lineno}: unknown key {key[:64]!r}")
        if key in values:
            raise RemoteProtocolError(f"query line {lineno}: duplicate key {key!r}")
        _check_value(
            key,
            value,
            allow_empty=key in ("requested_source", "intended_target"),
            error=RemoteProtocolError,
        )
        values[key] = value
    missing = sorted(REQUIRED_QUERY_KEYS - values.keys())
    if missing:
        raise RemoteProtocolError(f"query lacks required key(s): {', '.join(missing)}")
    return PolicyQuery(
        source=values["source"],
        requested_source=values.get("requested_source"),
        intended_target=values["intended_target"],
        service_and_arg=values["service_and_arg"],
        assume_yes_for_ask=_yes_no("assume_yes_for_ask", values.get("assume_yes_for_ask", "no")),
        just_evaluate=_yes_no("just_evaluate", values.get("just_evaluate", "no")),
    )


class QueryDecoder:
    """Incremental reader of one query from a byte stream.

    ``feed`` returns the query once the terminating empty line has arrived, ``None`` while
    more bytes are needed. Bytes after the terminator are not part of the query; they are
    left in :attr:`trailing` for the caller to ignore or refuse. Never buffers more than
    :data:`MAX_QUERY_BYTES`: a longer stream without a terminator raises at once.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self.trailing = b""
        self.done = False

    def feed(self, data: bytes) -> PolicyQuery | None:
        if self.done:
            raise LocalProtocolError("QueryDecoder already produced its query")
        search_from = max(len(self._buf) - 1, 0)
        self._buf += data
        if self._buf.startswith(b"\n"):
            end = 1
        else:
            pos = self._buf.find(b"\n\n", search_from)
            end = pos + 2 if pos >= 0 else -1
        if end < 0:
            if len(self._buf) > MAX_QUERY_BYTES:
                raise RemoteProtocolError(
                    f"query exceeds {MAX_QUERY_BYTES} bytes without an empty line"
                )
            return None
        self.done = True
        self.trailing = bytes(self._buf[end:])
        query = bytes(self._buf[:end])
        self._buf.clear()
        return parse_query(query)

    def eof(self) -> None:
        """The stream ended: an unfinished query is an error."""
        if not self.done:
            raise RemoteProtocolError(
                f"connection closed after {len(self._buf)} bytes, before the empty line"
            )


# --------------------------------------------------------------------------- response


@dataclass(frozen=True, slots=True)
class PolicyResponse:
    """A policy answer. For ``deny`` every other field except ``service``/``policy_source``
    is ``None``; for ``allow`` ``user``, ``target``, ``requested_target`` and ``autostart``
    are set (``target_uuid`` is ``None`` for dom0)."""

    result: Result
    user: str | None = None
    target: str | None = None
    target_uuid: str | None = None
    autostart: bool | None = None
    requested_target: str | None = None
    service: str | None = None
    policy_source: str | None = None

    @property
    def allowed(self) -> bool:
        return self.result == "allow"

    def fields(self) -> list[tuple[str, str]]:
        """The ``(key, value)`` pairs in wire order, validated by the §6.1 rules."""
        _validate_shape(self, LocalProtocolError, sending=True)
        _check_user(self.user, LocalProtocolError)
        out: list[tuple[str, str]] = [("result", self.result)]
        for key in RESPONSE_KEYS[1:]:
            value = getattr(self, key)
            if value is None:
                continue
            if isinstance(value, bool):
                value = "True" if value else "False"
            _check_value(key, value, allow_empty=False, error=LocalProtocolError)
            out.append((key, value))
        return out

    def encode(self) -> bytes:
        """The response bytes: one line per key, each ending in a newline."""
        data = "".join(f"{k}={v}\n" for k, v in self.fields()).encode("ascii")
        if len(data) > MAX_RESPONSE_BYTES:
            raise LocalProtocolError(
                f"response is {len(data)} bytes; qrexec-daemon reads at most {MAX_RESPONSE_BYTES}"
            )
        return data

    def lines(self) -> list[str]:
        """``key=value`` strings, as ``qrexec-policy-exec`` prints them."""
        return [f"{k}={v}" for k, v in self.fields()]


def _validate_shape(resp: PolicyResponse, error: type[Exception], *, sending: bool) -> None:
    """The allow/deny rules of §6.1. What we send is held a bit stricter than what we
    accept: our denies never carry ``target_uuid`` either (the spec only forbids the four
    allow-only keys there, so a peer's deny with one is still accepted)."""
    if resp.result not in ("allow", "deny"):
        raise error(f"result: expected allow or deny, got {resp.result!r}")
    present = {k for k in ALLOW_ONLY_KEYS if getattr(resp, k) is not None}
    if sending and resp.target_uuid is not None:
        present.add("target_uuid")
    if resp.result == "allow":
        missing = sorted(ALLOW_ONLY_KEYS - present)
        if missing:
            raise error(f"allow response lacks {', '.join(missing)}")
    elif present:
        raise error(f"deny response must not carry {', '.join(sorted(present))}")


def parse_response(data: bytes) -> PolicyResponse:
    """Parse a whole response (everything up to EOF), strictly as qrexec-daemon does."""
    if len(data) > MAX_RESPONSE_BYTES:
        raise RemoteProtocolError(f"response is longer than {MAX_RESPONSE_BYTES} bytes")
    if b"\0" in data:
        raise RemoteProtocolError("response contains a NUL byte")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError as exc:
        raise RemoteProtocolError(f"response is not ASCII (byte {exc.start})") from None
    if text.endswith("\n"):
        text = text[:-1]
    if not text:
        raise RemoteProtocolError("empty response")
    values: dict[str, str] = {}
    for lineno, line in enumerate(text.split("\n"), start=1):
        key, eq, value = line.partition("=")
        if not eq:
            raise RemoteProtocolError(f"response line {lineno} is not key=value: {line[:64]!r}")
        if key in values:
            raise RemoteProtocolError(f"response line {lineno}: duplicate key {key[:64]!r}")
        values[key] = value
    known = {k: v for k, v in values.items() if k in RESPONSE_KEYS}
    result = known.get("result")
    if result is None:
        raise RemoteProtocolError("response lacks result=")
    if result not in ("allow", "deny"):
        raise RemoteProtocolError(f"result: expected allow or deny, got {result[:64]!r}")
    autostart: bool | None = None
    if "autostart" in known:
        if known["autostart"] == "True":
            autostart = True
        elif known["autostart"] == "False":
            autostart = False
        else:
            raise RemoteProtocolError(
                f"autostart: expected True or False, got {known['autostart'][:64]!r}"
            )
    for key, value in known.items():
        if key not in ("result", "autostart"):
            _check_value(key, value, allow_empty=False, error=RemoteProtocolError)
    resp = PolicyResponse(
        result="allow" if result == "allow" else "deny",
        user=known.get("user"),
        target=known.get("target"),
        target_uuid=known.get("target_uuid"),
        autostart=autostart,
        requested_target=known.get("requested_target"),
        service=known.get("service"),
        policy_source=known.get("policy_source"),
    )
    _validate_shape(resp, RemoteProtocolError, sending=False)
    _check_user(resp.user, RemoteProtocolError)
    return resp


DENY: Final = PolicyResponse(result="deny")


def allow_response(
    *,
    target: str,
    target_uuid: str | None,
    user: str | None,
    autostart: bool,
    requested_target: str,
) -> PolicyResponse:
    """An allow in the §6.1 shapes.

    ``target`` is ``dom0`` (then ``target_uuid`` must be ``None``), a qube name (with
    ``target_uuid`` its UUID, or None when unknown), or ``@dispvm:NAME`` (with the UUID of
    NAME). The UUID
    gets its ``uuid:`` / ``@dispvm:uuid:`` prefix here; ``user`` ``None`` becomes
    ``DEFAULT``. An empty ``requested_target`` (caller named none) is sent as
    ``@default``, since the wire forbids empty values.
    """
    if target == "dom0":
        if target_uuid is not None:
            raise LocalProtocolError("dom0 targets carry no target_uuid")
        wire_uuid = None
    elif not target_uuid:
        # Not required by §6.1: qrexec-daemon then finds the target by name.
        wire_uuid = None
    else:
        bare = target_uuid.removeprefix("uuid:")
        wire_uuid = ("@dispvm:uuid:" if target.startswith("@dispvm:") else "uuid:") + bare
    return PolicyResponse(
        result="allow",
        user=user or "DEFAULT",
        target=target,
        target_uuid=wire_uuid,
        autostart=autostart,
        requested_target=requested_target or "@default",
    )
