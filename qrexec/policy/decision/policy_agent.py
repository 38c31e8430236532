"""``qrexec-policy-agent``: a non-GUI policy.Ask / policy.Notify socket service.

Upstream's agent shows GTK dialogs in the GuiVM. This one answers from a prompter
(``--answer scripted:FILE``, ``terminal[:TTY]`` or ``deny``) and records notifications
(log, and optionally ``--notify-log FILE`` as JSON lines), so the whole ask path —
policy daemon → socket service → answer → validation — runs for real in tests and in the
emulation. One socket serves both services, as upstream's ``policy-agent.sock`` does; in a
VM, ``/etc/qubes-rpc/policy.Ask`` and ``policy.Notify`` would be symlinks to it.

Usage: ``qrexec-policy-agent [-s/--socket-path PATH] [--answer SPEC] [--notify-log FILE]``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
from typing import Final

from qrexec.errors import QrexecError
from qrexec.policy.decision.agent_client import DEFAULT_AGENT_SOCKET
from qrexec.policy.decision.ask import MAX_PROMPT_BYTES, AskPrompt, Prompter
from qrexec.policy.decision.notify import Notification
from qrexec.policy.decision.prompters import make_prompter
from qrexec.policy.decision.socket_service import (
    ConnectionTracker,
    read_service_call,
    remove_socket,
    start_unix_service,
)

log = logging.getLogger("qrexec.policy.agent")

#: How long a caller may take to send its request (descriptor and body).
READ_TIMEOUT: Final = 30.0


class PolicyAgent:
    def __init__(self, prompter: Prompter, notify_log: str | None = None) -> None:
        self.prompter = prompter
        self.notify_log = notify_log

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                descriptor, body = await read_service_call(reader, max_body=MAX_PROMPT_BYTES)
            if descriptor.service == "policy.Ask":
                prompt = AskPrompt.from_json(body)
                log.info("ask from dom0: %s%s from %s, targets %s", prompt.service,
                         prompt.argument, prompt.source, ", ".join(prompt.targets))  # fmt: skip
                answer = await self.prompter.ask(prompt, "dom0")
                log.info("answer: %s", answer.decode("ascii", "replace"))
                writer.write(answer)
            elif descriptor.service == "policy.Notify":
                self.record(Notification.from_json(body))
            else:
                log.error("unknown service %r: closing", descriptor.service)
                return
            await writer.drain()
        except (QrexecError, TimeoutError, ConnectionError) as exc:
            log.error("bad request: %s", exc or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    def record(self, n: Notification) -> None:
        log.info("notification: %s %s%s from %s to %s", n.resolution, n.service, n.argument,
                 n.source, n.target)  # fmt: skip
        if self.notify_log:
            line = json.dumps(json.loads(n.to_json()), sort_keys=True) + "\n"
            fd = os.open(self.notify_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("ascii"))
            finally:
                os.close(fd)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="qrexec-policy-agent",
        description="A non-GUI policy.Ask / policy.Notify socket service (policy agent).",
    )
    p.add_argument(
        "-s",
        "--socket-path",
        default=DEFAULT_AGENT_SOCKET,
        help=f"socket serving both services (default {DEFAULT_AGENT_SOCKET})",
    )
    p.add_argument(
        "--answer",
        default="deny",
        help="how to answer policy.Ask: scripted:FILE | terminal[:TTY] | deny (default)",
    )
    p.add_argument("--notify-log", help="append every policy.Notify as a JSON line here")
    p.add_argument("-q", "--quiet", action="store_true")
    return p


async def serve(args: argparse.Namespace) -> None:
    if args.answer.startswith("policy-ask"):
        raise SystemExit("qrexec-policy-agent: --answer policy-ask would ask itself")
    try:
        prompter = make_prompter(args.answer, agent_socket="", qrexec_client="")
    except ValueError as exc:
        raise SystemExit(f"qrexec-policy-agent: {exc}") from None
    agent = PolicyAgent(prompter, args.notify_log)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    connections = ConnectionTracker()
    server = await start_unix_service(args.socket_path, connections.wrap(agent.handle))
    log.info("serving policy.Ask and policy.Notify on %s", args.socket_path)
    try:
        await stop.wait()
    finally:
        server.close()
        remove_socket(args.socket_path)
        await connections.aclose()


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
