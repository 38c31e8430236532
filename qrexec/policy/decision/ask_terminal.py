"""The ``terminal`` prompter: asks on dom0's controlling terminal (or any tty path).

For an interactive dom0 without a GUI policy agent. One prompt at a time (concurrent asks
queue behind a lock, so answers never go to the wrong question). The terminal is read
without blocking the event loop (non-blocking fd + ``add_reader``), so the daemon keeps
serving and the caller's timeout can cancel a prompt nobody answers.

Answers: ``y``/``yes`` (the default target, the requested one if it is a candidate, or the
only candidate; otherwise the user is asked to name one), a candidate's name, or
``n``/``no``/empty/EOF for deny. Anything else is asked again. Validation of the final
answer is still :func:`qrexec.policy.decision.ask.parse_ask_answer`'s.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from typing import Final

from qrexec.policy.decision.ask import AskPrompt

log = logging.getLogger(__name__)

MAX_LINE: Final = 1024


def interpret_reply(line: str, prompt: AskPrompt) -> str | None:
    """The wire answer for one typed line, or None when the question must be asked again."""
    word = line.strip()
    if word.lower() in ("", "n", "no", "deny"):
        return "deny"
    if word.lower() in ("y", "yes", "allow"):
        target = prompt.yes_target()
        return f"allow:{target}" if target is not None else None
    if word in prompt.targets:
        return f"allow:{word}"
    return None


def format_question(prompt: AskPrompt) -> str:
    default = prompt.yes_target()
    lines = [
        "",
        f"qrexec policy: {prompt.source} wants to call {prompt.service}{prompt.argument}",
        f"  possible targets: {', '.join(prompt.targets)}",
    ]
    if default is not None:
        lines.append(f"  'y' allows it to {default}; type a target name to choose another")
    else:
        lines.append("  type the target name to allow it")
    lines.append("Allow? [y/N/TARGET] ")
    return "\n".join(lines)


class TerminalPrompter:
    def __init__(self, tty_path: str = "/dev/tty") -> None:
        self.tty_path = tty_path
        self._lock: asyncio.Lock | None = None

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            fd = os.open(self.tty_path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
            try:
                _write(fd, format_question(prompt))
                while True:
                    line = await _read_line(fd)
                    if line is None:
                        _write(fd, "\n(end of input: denied)\n")
                        return b"deny"
                    answer = interpret_reply(line, prompt)
                    if answer is not None:
                        _write(fd, f"-> {answer}\n")
                        return answer.encode("ascii", "replace")
                    _write(fd, f"Answer y, n or one of: {', '.join(prompt.targets)} ")
            finally:
                os.close(fd)


def _write(fd: int, text: str) -> None:
    # A terminal that does not take output (full, or hung up) must not stall or crash the
    # daemon; the text is lost, reading the answer decides (EOF there means deny).
    try:
        os.write(fd, text.encode("utf-8", "replace"))
    except OSError as exc:
        log.warning("terminal prompter: cannot write to the terminal: %s", exc.strerror)


async def _read_line(fd: int) -> str | None:
    """One line from a non-blocking fd; None at EOF (or a hung-up terminal)."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while True:
        ready: asyncio.Future[None] = loop.create_future()

        def on_readable(fut: asyncio.Future[None] = ready) -> None:
            if not fut.done():
                fut.set_result(None)

        loop.add_reader(fd, on_readable)
        try:
            await ready
        finally:
            loop.remove_reader(fd)
        try:
            chunk = os.read(fd, MAX_LINE)
        except BlockingIOError:
            continue
        except OSError as exc:
            if exc.errno == errno.EIO:  # pty master closed: the terminal is gone
                return None
            raise
        if not chunk:
            return None
        buf += chunk
        if b"\n" in buf or len(buf) > MAX_LINE:
            with contextlib.suppress(ValueError):
                buf = buf[: buf.index(b"\n")]
            return buf.decode("utf-8", "replace")
