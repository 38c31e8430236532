"""Fuzz targets: every parser of untrusted bytes, each with its invariant.

A target takes one input (``bytes``) and returns normally or raises one of the errors the
parser is documented to raise; anything else (another exception, a broken invariant as
an AssertionError) is a crash. The invariants: only our error types; bounded buffering
(the frame and query decoders never hold more than their caps); and decode∘encode round
trips (what was decoded encodes back to something that decodes to the same value).

Used by :mod:`tests.fuzz.run` (atheris, coverage-guided, in ``.ci/run``) and by
:mod:`tests.fuzz.test_corpus` (every corpus file replayed in the fast suite). Importing
this module does not import atheris.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from qrexec.errors import (
    InvalidField,
    LocalProtocolError,
    PolicySyntaxError,
    ProtocolError,
    RemoteProtocolError,
    ServiceError,
)
from qrexec.policy.decision.socket_service import parse_descriptor
from qrexec.policy.decision.wire import QueryDecoder, parse_query, parse_response
from qrexec.policy.engine.parser import parse_policy_text
from qrexec.protocol.cmdline import (
    decode_cmdline,
    is_rpc_command,
    parse_rpc_command,
    parse_user_command,
    replace_default_user,
)
from qrexec.protocol.constants import MAX_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, MsgType
from qrexec.protocol.fields import convert_trigger, validate_trigger
from qrexec.protocol.framing import FrameDecoder
from qrexec.protocol.messages import (
    Message,
    TriggerService,
    TriggerService3,
    TriggerService4,
    decode_payload,
    encode,
)
from qrexec.services.rpc_config import parse_rpc_config
from qrexec.sim import filecopy
from qrexec.sim.qubesd import AdminError, parse_request

Target = Callable[[bytes], None]

MSG_TYPES = tuple(MsgType)
TRIGGER_TYPES = (MsgType.TRIGGER_SERVICE, MsgType.TRIGGER_SERVICE3, MsgType.TRIGGER_SERVICE4)
VERSIONS = tuple(range(MIN_PROTOCOL_VERSION, MAX_PROTOCOL_VERSION + 1))


def _round_trip(message: Message, version: int) -> None:
    """An accepted message encodes to bytes that decode to a message encoding to the same
    bytes (fixed fields may come back with their padding, so bytes are compared)."""
    try:
        raw = encode(message)
    except LocalProtocolError:
        # Some decoders accept what our encoder refuses to produce (a lax peer's
        # layout); that is not a round trip we promise.
        return
    again = FrameDecoder(version).feed(raw)
    assert len(again) == 1 and encode(again[0]) == raw, (message, again)


def frames(data: bytes) -> None:
    """The control/data frame decoder fed in chunks: caps hold, messages round-trip."""
    if len(data) < 2:
        return
    version = VERSIONS[data[0] % len(VERSIONS)]
    step = 1 + data[1] % 64
    body = data[2:]
    decoder = FrameDecoder(version)
    try:
        for pos in range(0, len(body), step):
            for message in decoder.feed(body[pos : pos + step]):
                _round_trip(message, version)
            assert decoder.buffered <= decoder.max_buffered
        decoder.close()
    except RemoteProtocolError:
        return


def messages(data: bytes) -> None:
    """Every message layout's payload decoder: only ProtocolError, round trips."""
    if not data:
        return
    kind = MSG_TYPES[data[0] % len(MSG_TYPES)]
    try:
        message = decode_payload(kind, data[1:])
    except ProtocolError:
        return
    _round_trip(message, MAX_PROTOCOL_VERSION)


def trigger(data: bytes) -> None:
    """Trigger payloads: validation refuses with InvalidField (connection kept) or drops
    with RemoteProtocolError; conversion to every version stays encodable."""
    if not data:
        return
    kind = TRIGGER_TYPES[data[0] % len(TRIGGER_TYPES)]
    try:
        message = decode_payload(kind, data[1:])
    except RemoteProtocolError:
        return
    assert isinstance(message, TriggerService | TriggerService3 | TriggerService4)
    try:
        request = validate_trigger(message)
    except InvalidField:
        request = None
    if request is not None:
        assert request.service and not request.service.startswith("+")
    for version in VERSIONS:
        try:
            converted = convert_trigger(message, version)
        except InvalidField:
            continue
        _round_trip(converted, version)


def cmdline(data: bytes) -> None:
    """Command lines of EXEC_CMDLINE: ``USER:[nogui:]COMMAND`` and QUBESRPC calls."""
    try:
        text = decode_cmdline(data)
        command = parse_user_command(text)
    except ProtocolError:
        return
    replace_default_user(text, "user")
    if not is_rpc_command(command.command):
        return
    try:
        call = parse_rpc_command(command.command)
    except RemoteProtocolError:
        return
    try:
        rebuilt = call.build()
    except LocalProtocolError:
        return
    assert parse_rpc_command(rebuilt) == call, (call, rebuilt)


def rpc_config(data: bytes) -> None:
    """rpc-config files (TOML): only ServiceError."""
    try:
        parse_rpc_config(data.decode("utf-8", "surrogateescape"), "fuzz")
    except ServiceError:
        return


def policy_file(data: bytes) -> None:
    """Policy files: only PolicySyntaxError, which names the file and line."""
    try:
        parse_policy_text(data.decode("utf-8", "surrogateescape"), "fuzz.policy")
    except PolicySyntaxError as exc:
        assert "fuzz.policy" in str(exc)


def policy_query(data: bytes) -> None:
    """Policy-daemon requests fed in chunks: bounded, only RemoteProtocolError, round trip;
    and the daemon's parse of the policy's answer."""
    if not data:
        return
    step = 1 + data[0] % 128
    body = data[1:]
    decoder = QueryDecoder()
    query = None
    try:
        for pos in range(0, len(body), step):
            query = decoder.feed(body[pos : pos + step])
            if query is not None:
                break
        else:
            decoder.eof()
    except RemoteProtocolError:
        pass
    if query is not None:
        assert parse_query(query.encode()) == query
    try:
        response = parse_response(body)
    except ProtocolError:
        return
    if response.result == "deny" and response.target_uuid is not None:
        # Accepted from a peer (the spec forbids only the allow-only keys in a deny) but
        # never sent by us: what we send of it is the deny without the uuid.
        response = dataclasses.replace(response, target_uuid=None)
    assert parse_response(response.encode()) == response


def descriptor(data: bytes) -> None:
    """Socket-service descriptors (read by the policy daemon's Eval services)."""
    try:
        parsed = parse_descriptor(data)
    except RemoteProtocolError:
        return
    try:
        raw = parsed.encode()
    except LocalProtocolError:
        return
    assert parse_descriptor(raw[:-1]) == parsed


def admin_request(data: bytes) -> None:
    """Requests to the testbed's qubesd stand-in: only AdminError."""
    try:
        parse_request(data)
    except AdminError:
        return


def filecopy_receiver(data: bytes) -> None:
    """The qubes.Filecopy receiver: only CopyError, and nothing outside its folder."""
    scratch = Path(tempfile.mkdtemp(prefix="fuzz-filecopy-"))
    try:
        home = scratch / "home"
        home.mkdir()
        answer = io.BytesIO()
        with contextlib.suppress(filecopy.CopyError):
            filecopy.receive("vm1", home, io.BytesIO(data), answer)
        incoming = home / "QubesIncoming" / "vm1"
        for root, dirs, files in os.walk(scratch):
            for name in dirs + files:
                path = Path(root, name)
                if path in (home, home / "QubesIncoming", incoming):
                    continue
                assert path.is_relative_to(incoming), path
                assert not stat.S_ISLNK(os.lstat(path).st_mode), path
    finally:
        for root, dirs, _ in os.walk(scratch):
            for name in dirs:
                os.chmod(Path(root, name), 0o700)
        shutil.rmtree(scratch)


TARGETS: dict[str, Target] = {
    "frames": frames,
    "messages": messages,
    "trigger": trigger,
    "cmdline": cmdline,
    "rpc_config": rpc_config,
    "policy_file": policy_file,
    "policy_query": policy_query,
    "descriptor": descriptor,
    "admin_request": admin_request,
    "filecopy": filecopy_receiver,
}
