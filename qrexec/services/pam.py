"""A minimal ctypes binding of libpam (``libpam.so.0``) for the root agent's user switch.

Covers exactly what spec §7's login sequence needs: ``pam_start`` (or
``pam_start_confdir`` when a private configuration folder is given, which lets tests run
without writing ``/etc/pam.d``), ``pam_authenticate``, ``pam_setcred``,
``pam_open_session``/``pam_close_session``, ``pam_getenvlist`` and ``pam_end``.

The conversation function answers every prompt with an empty string, as upstream's agent
does: dom0's policy already decided that the call may run, so there is nobody to ask and
nothing to type. Informational and error messages from modules are logged.

ctypes (standard library) rather than cffi: only the per-call PAM helper
(:mod:`.pam_login`) imports this module, never the agent itself, and no compiler or
header is needed. Does not fork, switch identity or run anything.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

from qrexec.errors import PamError

log = logging.getLogger(__name__)

LIBPAM = "libpam.so.0"

PAM_SUCCESS = 0
PAM_BUF_ERR = 5
PAM_CONV_ERR = 19
PAM_ABORT = 26
PAM_ESTABLISH_CRED = 0x0002
PAM_DELETE_CRED = 0x0004
PAM_SILENT = 0x8000

PAM_PROMPT_ECHO_OFF = 1
PAM_PROMPT_ECHO_ON = 2
PAM_ERROR_MSG = 3
PAM_TEXT_INFO = 4
#: Prompts answered with an empty string; other styles get no answer.
_PROMPTS = frozenset({PAM_PROMPT_ECHO_OFF, PAM_PROMPT_ECHO_ON})


class PamMessage(ctypes.Structure):
    _fields_ = [("msg_style", ctypes.c_int), ("msg", ctypes.c_char_p)]


class PamResponse(ctypes.Structure):
    # ``resp`` is a void pointer: libpam frees it, so it must come from our malloc.
    _fields_ = [("resp", ctypes.c_void_p), ("resp_retcode", ctypes.c_int)]


ConvFunction = ctypes.CFUNCTYPE(
    ctypes.c_int,
    ctypes.c_int,
    ctypes.POINTER(ctypes.POINTER(PamMessage)),
    ctypes.POINTER(ctypes.POINTER(PamResponse)),
    ctypes.c_void_p,
)


class PamConv(ctypes.Structure):
    _fields_ = [("conv", ConvFunction), ("appdata_ptr", ctypes.c_void_p)]


def _load() -> tuple[Any, Any]:
    """libpam and the C library (for the malloc'd answers libpam frees)."""
    try:
        pam = ctypes.CDLL(LIBPAM)
        libc = ctypes.CDLL(None)
    except OSError as exc:
        raise PamError("dlopen", PAM_ABORT, f"cannot load {LIBPAM}: {exc}") from None
    pam.pam_strerror.restype = ctypes.c_char_p
    pam.pam_strerror.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_getenvlist.restype = ctypes.POINTER(ctypes.c_void_p)
    pam.pam_getenvlist.argtypes = [ctypes.c_void_p]
    for name in ("pam_authenticate", "pam_setcred", "pam_open_session", "pam_close_session"):
        function = getattr(pam, name)
        function.restype = ctypes.c_int
        function.argtypes = [ctypes.c_void_p, ctypes.c_int]
    pam.pam_end.restype = ctypes.c_int
    pam.pam_end.argtypes = [ctypes.c_void_p, ctypes.c_int]
    libc.calloc.restype = ctypes.c_void_p
    libc.calloc.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    libc.strdup.restype = ctypes.c_void_p
    libc.strdup.argtypes = [ctypes.c_char_p]
    libc.free.restype = None
    libc.free.argtypes = [ctypes.c_void_p]
    return pam, libc


def _answer_prompts(
    libc: Any,
    count: int,
    messages: Any,
    responses: Any,
) -> int:
    """The conversation: an empty answer to every prompt, other messages logged."""
    if count <= 0:
        return PAM_CONV_ERR
    array = libc.calloc(count, ctypes.sizeof(PamResponse))
    if not array:
        return PAM_BUF_ERR
    answers = ctypes.cast(array, ctypes.POINTER(PamResponse))
    for index in range(count):
        message = messages[index].contents
        text = (message.msg or b"").decode(errors="replace")
        if message.msg_style in _PROMPTS:
            answers[index].resp = libc.strdup(b"")
            log.debug("PAM prompt %r answered with an empty string", text)
        elif message.msg_style == PAM_ERROR_MSG:
            log.warning("PAM: %s", text)
        else:
            log.info("PAM: %s", text)
    responses[0] = answers
    return PAM_SUCCESS


class PamSession:
    """One PAM transaction (``pam_start`` … ``pam_end``) for one user of one service.

    Every failing step raises :class:`~qrexec.errors.PamError` naming the step and
    libpam's reason; :meth:`end` must be called in every case (it is idempotent).
    """

    def __init__(self, service: str, user: str, *, confdir: str | None = None) -> None:
        self._pam, self._libc = _load()
        libc = self._libc

        def converse(count: int, messages: Any, responses: Any, _data: Any) -> int:
            try:
                return _answer_prompts(libc, count, messages, responses)
            except Exception:  # an exception must never unwind into libpam
                log.exception("PAM conversation failed")
                return PAM_CONV_ERR

        # Both must outlive the handle: libpam keeps calling the function pointer.
        self._callback = ConvFunction(converse)
        self._conv = PamConv(self._callback, None)
        self._handle = ctypes.c_void_p()
        self._status = PAM_SUCCESS
        if confdir is None:
            code = self._pam.pam_start(
                service.encode(),
                user.encode(),
                ctypes.byref(self._conv),
                ctypes.byref(self._handle),
            )
        else:
            code = self._pam.pam_start_confdir(
                service.encode(), user.encode(), ctypes.byref(self._conv),
                confdir.encode(), ctypes.byref(self._handle),
            )  # fmt: skip
        if code != PAM_SUCCESS or not self._handle:
            self._handle = ctypes.c_void_p()
            raise PamError("pam_start", int(code), f"cannot start PAM service {service!r}")

    def _call(self, name: str, flags: int) -> None:
        if not self._handle:
            raise PamError(name, PAM_ABORT, "the PAM transaction has ended")
        code = int(getattr(self._pam, name)(self._handle, flags))
        if code != PAM_SUCCESS:
            if self._status == PAM_SUCCESS:
                self._status = code  # pam_end hears of the first failure
            raise PamError(name, code, self.strerror(code))

    def strerror(self, code: int) -> str:
        text = self._pam.pam_strerror(self._handle, code)
        return text.decode(errors="replace") if text else f"PAM error {code}"

    def authenticate(self, flags: int = 0) -> None:
        self._call("pam_authenticate", flags)

    def establish_credentials(self) -> None:
        self._call("pam_setcred", PAM_ESTABLISH_CRED)

    def delete_credentials(self) -> None:
        self._call("pam_setcred", PAM_DELETE_CRED | PAM_SILENT)

    def open_session(self) -> None:
        self._call("pam_open_session", 0)

    def close_session(self) -> None:
        self._call("pam_close_session", 0)

    def environment(self) -> dict[str, str]:
        """The PAM environment (``pam_getenvlist``), freeing libpam's copy."""
        if not self._handle:
            return {}
        entries = self._pam.pam_getenvlist(self._handle)
        if not entries:
            return {}
        result: dict[str, str] = {}
        index = 0
        try:
            while entries[index]:
                raw = ctypes.string_at(entries[index])
                name, sep, value = raw.decode(errors="surrogateescape").partition("=")
                if sep and name:
                    result[name] = value
                self._libc.free(entries[index])
                index += 1
        finally:
            self._libc.free(entries)
        return result

    def end(self) -> None:
        """``pam_end`` with the first failed step's status; later calls do nothing."""
        if self._handle:
            self._pam.pam_end(self._handle, self._status)
            self._handle = ctypes.c_void_p()
