"""Loggers that import :mod:`logging` only when a record could be shown.

The per-call clients start once per call and log only on error paths (and with ``-v``),
yet importing the logging package (it brings traceback, string, weakref...) is a sizeable
share of their start-up. Until something imports logging, nothing can have configured it,
so the root level is WARNING and DEBUG/INFO records would be dropped unseen:
:class:`LazyLogger` drops them without importing anything. WARNING and above import
logging, apply the configuration a client deferred with :func:`configure`, and go to the
real logger. Once logging is imported (the agent and the daemon, which share the backends
with the clients; a client run with ``-v``), every call goes straight to the real logger.
Code that logs through plain :mod:`logging` comes into a client only behind a :func:`sync`,
which applies the deferred configuration before that code can log.

Not a logging framework: only the methods this project's client paths use.
"""

from __future__ import annotations

import sys

TYPE_CHECKING = False  # typing is not imported at run time: the clients load this module
if TYPE_CHECKING:
    import logging
    from typing import Any

#: basicConfig arguments a client deferred until its first shown record.
_pending: dict[str, Any] | None = None


def configure(*, debug: bool, format: str) -> None:
    """``logging.basicConfig`` for a client: at once with ``debug`` (records of every level
    are wanted) or when logging is loaded already; otherwise before its first record."""
    global _pending
    if debug or "logging" in sys.modules:
        import logging

        logging.basicConfig(level=logging.DEBUG if debug else logging.WARNING, format=format)
        _pending = None
    else:
        _pending = {"level": "WARNING", "format": format}


def _apply_pending() -> None:
    global _pending
    if _pending is not None:
        import logging

        settings, _pending = _pending, None
        logging.basicConfig(**settings)


def sync() -> None:
    """Apply a deferred configuration if logging has been loaded meanwhile.

    Called after importing code that logs through plain :mod:`logging` (the vchan backend,
    dom0-local services), whose records would otherwise miss the client's format.
    """
    if "logging" in sys.modules:
        _apply_pending()


class LazyLogger:
    """Stands for ``logging.getLogger(name)``; see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name

    def _real(self) -> logging.Logger:
        import logging

        _apply_pending()
        return logging.getLogger(self.name)

    @staticmethod
    def _caller(kwargs: dict[str, Any]) -> dict[str, Any]:
        # Records name the caller's line, not this wrapper's.
        kwargs["stacklevel"] = kwargs.get("stacklevel", 1) + 1
        return kwargs

    def debug(self, msg: object, *args: object, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().debug(msg, *args, **self._caller(kwargs))

    def info(self, msg: object, *args: object, **kwargs: Any) -> None:
        if "logging" in sys.modules:
            self._real().info(msg, *args, **self._caller(kwargs))

    def warning(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._real().warning(msg, *args, **self._caller(kwargs))

    def error(self, msg: object, *args: object, **kwargs: Any) -> None:
        self._real().error(msg, *args, **self._caller(kwargs))


def get_logger(name: str) -> LazyLogger:
    """A :class:`LazyLogger` for ``name`` (as ``logging.getLogger(name)``)."""
    return LazyLogger(name)
