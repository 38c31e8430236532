"""The one exception hierarchy of the project.

Why one hierarchy: every program decides its exit code in one place, and it can only do so
if every failure it may see is one of a handful of known kinds. The split follows h11 and
trio: *local* protocol errors mean we misused an API, *remote* ones mean the peer (an
untrusted VM, usually) misbehaved; a transport we closed ourselves is distinct from one
whose peer or domain died.

This module does no I/O and imports nothing but the standard library.
"""

from __future__ import annotations


class QrexecError(Exception):
    """Base of every error this project raises on purpose."""


class ProtocolError(QrexecError):
    """A qrexec message could not be built or was not acceptable."""


class LocalProtocolError(ProtocolError):
    """We tried to build or send something the protocol does not allow."""


class RemoteProtocolError(ProtocolError):
    """The peer sent something that violates the protocol (bad framing, length, type...).

    The rule for untrusted peers: a remote protocol error drops that peer's connection,
    with the message of this exception as the logged reason.
    """


class InvalidField(RemoteProtocolError):
    """A field of an otherwise well-formed message is not acceptable (bad request id,
    empty service name...). Unlike other remote errors the connection survives: the
    daemon answers MSG_SERVICE_REFUSED, echoing ``ident`` (the raw 32 bytes) when known.
    """

    def __init__(self, field: str, reason: str, *, ident: bytes | None = None) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason
        self.ident = ident


class TransportError(QrexecError):
    """A transport (vchan, emulated vchan, in-memory pipe) failed."""


class TransportClosed(TransportError):
    """The stream was closed by our side; using it further is a bug or a race we lost."""


class TransportBroken(TransportError):
    """The peer went away or its domain died while we still needed the stream."""


class TransportUnavailable(TransportError):
    """The requested backend cannot be used here (library missing, not configured)."""


class AccessDenied(QrexecError):
    """Policy refused a call.

    ``notify`` says whether the user should be told (policy's ``notify=``).
    """

    def __init__(self, message: str, *, notify: bool = True) -> None:
        super().__init__(message)
        self.notify = notify


class PolicySyntaxError(AccessDenied):
    """A policy file is malformed; every call is denied until it is fixed.

    Printed as ``path:lineno: reason`` like Qubes' own tools, so editors can jump to it.
    """

    def __init__(self, path: str, lineno: int | None, reason: str) -> None:
        self.path = path
        self.lineno = lineno
        self.reason = reason
        where = f"{path}:{lineno}" if lineno is not None else path
        super().__init__(f"{where}: {reason}", notify=True)


class PolicyNotFound(AccessDenied):
    """No rule matched the request (which also means deny)."""


class UsageError(QrexecError):
    """A command line was malformed; programs exit 2 on it."""


class SystemInfoError(QrexecError):
    """The system information (qubesd ``internal.GetSystemInfo`` data) is malformed.

    Policy evaluation cannot match tags, types or disposables without it, so callers deny.
    """


class ServiceError(QrexecError):
    """A service or command could not be prepared or started in its domain (exit 125)."""


class ServiceNotFound(ServiceError):
    """No file on the service path names the requested service (exit 127)."""


class PamError(ServiceError):
    """A PAM step refused or failed for a call's user (the call fails with exit 125).

    ``step`` is the libpam function (``pam_authenticate``…), ``code`` its PAM return value.
    """

    def __init__(self, step: str, code: int, reason: str) -> None:
        super().__init__(f"{step}: {reason}")
        self.step = step
        self.code = code


class CallFailed(QrexecError):
    """``check=True`` of the in-process client: the call ended with a non-zero exit code.

    ``result`` is the whole :class:`~qrexec.client.api.CallResult` (output included), so a
    caller can still log what the service said. The subclasses below give the codes that
    keep their Qubes meaning a type of their own.
    """

    def __init__(self, message: str, result: object) -> None:
        super().__init__(message)
        self.result = result


class CallRefused(CallFailed, AccessDenied):
    """Exit code 126: policy refused the call."""

    def __init__(self, message: str, result: object) -> None:
        CallFailed.__init__(self, message, result)
        self.notify = True


class CallServiceNotFound(CallFailed, ServiceNotFound):
    """Exit code 127: the target has no such service (or command)."""


class CallProblem(CallFailed):
    """Exit code 125: qrexec itself failed somewhere along the call."""


class CallTimeout(QrexecError, TimeoutError):
    """The in-process call did not finish within its ``timeout``."""
