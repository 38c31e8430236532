"""policy.EvalSimple and policy.EvalGUI: dom0 socket services answering "would policy allow
this?" (spec §6.4), served by the policy daemon.

The caller (qrexec-client running a VM→dom0 call, or any dom0 program) connects to the
service socket and writes the service descriptor ``policy.EvalSimple+SERVICE[+ARG] CALLER
TYPE TARGET\\0`` (or the two-word VM form), then the body ``SOURCE\\0TARGET`` (≤ 96 bytes;
source 1 to 31 characters, target 1 to 63), then shuts down its writing side. The reply is
exactly ``result=allow`` or ``result=deny``; ``ask`` counts as allow and nobody is asked
(``just_evaluate``). EvalGUI answers only the GuiVM of both qubes (tag ``guivm-CALLER``, or
the ``guivm`` property that tag mirrors in qubesd); anyone else gets a deny.

Malformed input is logged and the connection closed without a reply.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Final

from qrexec.errors import QrexecError, RemoteProtocolError
from qrexec.policy.decision.audit import AuditRecord
from qrexec.policy.decision.decide import Decider
from qrexec.policy.decision.socket_service import read_service_call
from qrexec.policy.decision.wire import PolicyQuery
from qrexec.policy.engine.system_info import SystemInfo

log = logging.getLogger(__name__)

MAX_BODY: Final = 96
MAX_SOURCE: Final = 31
MAX_TARGET: Final = 63
READ_TIMEOUT: Final = 10.0


def parse_eval_body(body: bytes) -> tuple[str, str]:
    """``SOURCE\\0TARGET`` → (source, target), each printable ASCII within its length."""
    if len(body) > MAX_BODY:
        raise RemoteProtocolError(f"body is {len(body)} bytes; at most {MAX_BODY}")
    source_b, nul, target_b = body.partition(b"\0")
    if not nul:
        raise RemoteProtocolError("body is not SOURCE\\0TARGET")
    out = []
    for raw, what, cap in ((source_b, "source", MAX_SOURCE), (target_b, "target", MAX_TARGET)):
        if not 1 <= len(raw) <= cap:
            raise RemoteProtocolError(f"{what} must be 1 to {cap} characters")
        if any(not 0x21 <= b <= 0x7E for b in raw):
            raise RemoteProtocolError(f"{what} has a byte that is not printable ASCII")
        out.append(raw.decode("ascii"))
    return out[0], out[1]


def is_guivm_of(caller: str, qube: str, info: SystemInfo) -> bool:
    dom = info.get(qube)
    if dom is None:
        return False
    return f"guivm-{caller}" in dom.tags or dom.guivm == caller


class EvalService:
    """One of the two services; ``gui`` selects EvalGUI's caller check."""

    def __init__(self, decider: Decider, *, gui: bool) -> None:
        self.decider = decider
        self.gui = gui
        self.name = "policy.EvalGUI" if gui else "policy.EvalSimple"

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                descriptor, body = await read_service_call(reader, max_body=MAX_BODY)
            if descriptor.service != self.name or not descriptor.argument:
                raise RemoteProtocolError(
                    f"descriptor names {descriptor.service}+{descriptor.argument}; "
                    f"expected {self.name}+SERVICE"
                )
            source, target = parse_eval_body(body)
            allowed = await self.evaluate(descriptor.source, descriptor.argument, source, target)
            writer.write(b"result=allow" if allowed else b"result=deny")
            await writer.drain()
        except (QrexecError, TimeoutError, ConnectionError) as exc:
            log.warning("%s: request refused: %s", self.name, exc or type(exc).__name__)
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def evaluate(self, caller: str, service_and_arg: str, source: str, target: str) -> bool:
        query = PolicyQuery(
            source=source,
            intended_target=target,
            service_and_arg=service_and_arg,
            just_evaluate=True,
        )
        if self.gui:
            info = self.decider.system_info.get_system_info()
            if not (is_guivm_of(caller, source, info) and is_guivm_of(caller, target, info)):
                self.decider.audit.record(
                    AuditRecord(
                        channel=self.name,
                        source=source,
                        requested_source=None,
                        requested_target=target,
                        target=None,
                        service=query.service,
                        argument=query.argument,
                        result="deny",
                        user=None,
                        rule=None,
                        reason=f"{caller} is not the GuiVM of both {source} and {target}",
                        just_evaluate=True,
                    )
                )
                return False
        response = await self.decider.decide(query, channel=self.name)
        return response.allowed
