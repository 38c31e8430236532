"""VM-initiated calls in qrexec-daemon: triggers, policy, and completing the call (spec §4).

Installed by :mod:`.cli` (``install``) into the seams of :class:`~.core.Daemon`:

**Triggers.** The control-channel decoder already lets through only the trigger types the
negotiated version allows (v2: MSG_TRIGGER_SERVICE; v3: TRIGGER_SERVICE3; v4:
TRIGGER_SERVICE3 *and* TRIGGER_SERVICE4, as upstream's daemon - an R4.2 agent behind an
R4.3 dom0 keeps working); any other type, a wrong length or an over-long name is a
protocol violation that drops the agent. Then, per §15.2: domain names and the service
name are sanitised (each bad byte becomes ``_``, so a sanitised name simply fails to match
policy; a full-length target or source loses its last byte) and a bad request id, a
service name without its NUL or with a NUL before it, an empty one or one starting with
``+`` is refused at once with SERVICE_REFUSED (the 32 request-id bytes as received),
without asking the policy; the connection stays. A valid request takes a pending slot
(:class:`~.pending.PendingRequests`, at most 256 per VM; refused beyond, or when its
ident is already pending).

**Policy.** :mod:`.policy_query` asks the policy daemon (falling back to the policy
program); anything but a well-formed allow refuses the call (SERVICE_REFUSED; the caller
exits 126). Decisions are logged by the policy side (its audit log).

**Allowed, VM → VM** (upstream's child of the daemon is a task here):

1. the command is ``USER:QUBESRPC SERVICE+ARG SOURCE`` with the policy's ``user=`` (``DEFAULT``
   is replaced by the target daemon), ``service=`` if given (RemoteVM relaying) or the
   requested name with ``+`` added when it had none, and ``policy_source=`` or our VM's name;
2. the target is the policy's ``target=``: for ``@dispvm:NAME``, qubesd's
   ``admin.vm.CreateDisposable`` (payload ``uuid``) makes a fresh disposable first; the
   target daemon's socket is ``qrexec.uuid:<uuid>`` when the policy gave a uuid, else
   ``qrexec.<name>``; when it is missing and ``autostart=True``, ``admin.vm.Start`` starts
   the target (qubesd socket ``--qubesd-socket`` / ``QREXEC_QUBESD_SOCKET``) and the socket
   is waited for;
3. EXEC_CMDLINE ``{our domid, 0}`` to the target daemon gives ``{target domid, port}``;
4. SERVICE_CONNECT ``{target domid, port}`` + ident goes to our agent, through the pending
   registry (what upstream's child does over our own socket): only if the request is still
   pending, so the answer is sent at most once (``qrexec-client -c`` may have taken it);
5. a disposable is killed (``admin.vm.Kill``) once the target daemon closes the socket,
   i.e. when the call has ended.

**Allowed, VM → dom0** (target ``dom0``): a port is allocated for dom0, SERVICE_CONNECT
``{0, port}`` goes to the agent and :mod:`.vm_calls_dom0` serves the call.

Any failure after the policy said yes refuses the call if it is still pending. Everything
from the agent is untrusted; nothing here blocks the control loop (each request is a
task) and a broken request never affects another.
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

from qrexec.daemon.core import Daemon
from qrexec.daemon.pending import PendingRequest
from qrexec.daemon.policy_query import PolicySettings, ask_policy
from qrexec.daemon.vm_calls_dom0 import run_dom0_service
from qrexec.daemon.vm_calls_peers import PeerError, TargetDaemon, admin_call
from qrexec.errors import InvalidField, QrexecError
from qrexec.policy.decision.wire import PolicyQuery, PolicyResponse
from qrexec.protocol.cmdline import (
    build_rpc_command,
    build_user_command,
    requested_target_fields,
)
from qrexec.protocol.constants import MsgType
from qrexec.protocol.fields import TriggerRequest, validate_trigger_frame
from qrexec.protocol.messages import (
    Message,
    RawFrame,
    ServiceConnect,
    ServiceRefused,
    TriggerService,
)

log = logging.getLogger(__name__)

DOM0_NAMES = frozenset({"dom0", "@adminvm", "uuid:00000000-0000-0000-0000-000000000000"})
DISPVM_PREFIX = "@dispvm:"
#: After asking qubesd to start a target, wait this long for its daemon socket.
AUTOSTART_SOCKET_WAIT = 60.0


class CallFailed(QrexecError):
    """An allowed call could not be completed (it is refused)."""


@dataclass
class VmCall:
    """One request from our VM, from trigger to answer."""

    request: TriggerRequest
    entry: PendingRequest
    generation: int
    #: True once the call reached its data phase (the VM was told where to connect and,
    #: for dom0 calls, both HELLOs are through): losing the agent no longer cancels it.
    streaming: bool = False


class VmCalls:
    """VM-initiated call handling for one daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        config = daemon.config
        self.policy = PolicySettings(config.policy_socket, config.policy_program)
        self.env = dict(os.environ)
        #: Running calls (a task per request) and their state.
        self._tasks: dict[asyncio.Task[None], VmCall] = {}

    def install(self) -> None:
        for kind in (MsgType.TRIGGER_SERVICE, MsgType.TRIGGER_SERVICE3, MsgType.TRIGGER_SERVICE4):
            self.daemon.register_handler(kind, self.on_trigger)
        self.daemon.on_agent_lost.append(self.agent_lost)

    def agent_lost(self) -> None:
        """Cancel every call that has not reached its data phase (docs/decisions.md).

        Nobody is left to answer: the pending requests are gone with the connection. A
        cancelled call closes its vchan and frees its buffers; streaming calls finish.
        """
        cancelled = 0
        for task, call in list(self._tasks.items()):
            if not call.streaming and not task.done():
                task.cancel()
                cancelled += 1
        if cancelled:
            log.info(
                "agent of %s gone: cancelled %d call(s) still in their handshake",
                self.daemon.config.name,
                cancelled,
            )

    # ---- the agent's trigger ----

    async def on_trigger(self, message: Message) -> None:
        """Validate, take a pending slot and start the call; never blocks the control loop."""
        assert isinstance(message, RawFrame | TriggerService)
        daemon = self.daemon
        name = daemon.config.name
        try:
            request = validate_trigger_frame(message)
        except InvalidField as exc:
            log.warning("refusing a request from %s: %s", name, exc)
            await daemon.send_to_agent(ServiceRefused(exc.ident or b""))
            return
        entry = daemon.pending.add(request.ident)
        if entry is None:
            why = "already pending" if request.ident in daemon.pending else "too many pending"
            log.warning(
                "refusing %s from %s (%s -> %s): %s",
                request.ident,
                name,
                request.service,
                request.target,
                why,
            )
            await daemon.send_to_agent(ServiceRefused(request.raw_ident))
            return
        call = VmCall(request, entry, daemon.generation)
        entry.details = call
        task = asyncio.ensure_future(self.run(call))
        self._tasks[task] = call
        task.add_done_callback(self._forget)

    def _forget(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    # ---- answering the agent ----

    def _still_pending(self, call: VmCall) -> bool:
        return self.daemon.pending.get(call.entry.ident) is call.entry

    def _claim(self, call: VmCall) -> bool:
        """Take the request out of the registry; False if it was answered or dropped."""
        if not self._still_pending(call):
            return False
        self.daemon.pending.claim(call.entry.ident)
        return True

    async def refuse(self, call: VmCall, reason: str) -> None:
        if self._claim(call):
            log.info(
                "refused %s from %s: %s -> %s: %s",
                call.request.ident,
                self.daemon.config.name,
                call.request.service,
                call.request.target or "@default",
                reason,
            )
            await self.daemon.send_to_agent(ServiceRefused(call.request.raw_ident), call.generation)

    async def connect(self, call: VmCall, domain: int, port: int) -> bool:
        """SERVICE_CONNECT to our agent (through the registry, like a socket client)."""
        if not self._claim(call):
            log.warning("request %s was answered elsewhere or dropped", call.request.ident)
            return False
        return await self.daemon.send_to_agent(
            ServiceConnect(domain, port, call.request.raw_ident), call.generation
        )

    # ---- one call ----

    async def run(self, call: VmCall) -> None:
        try:
            response = await ask_policy(self.policy, self.query(call.request))
            if not response.allowed:
                await self.refuse(call, "denied by policy")
                return
            assert response.target is not None
            if not self._still_pending(call):
                # Answered meanwhile (``qrexec-client -c``) or the agent went away: start
                # nothing in the target.
                log.info("request %s is no longer pending after the policy", call.request.ident)
                return
            if response.target in DOM0_NAMES:
                await self.call_dom0(call, response)
            else:
                await self.call_vm(call, response)
        except QrexecError as exc:
            log.error(
                "call %s from %s failed: %s", call.request.ident, self.daemon.config.name, exc
            )
        except Exception:
            log.exception("call %s from %s crashed", call.request.ident, self.daemon.config.name)
        finally:
            await self.refuse(call, "the call could not be completed")

    def query(self, request: TriggerRequest) -> PolicyQuery:
        return PolicyQuery(
            source=self.daemon.config.name,
            requested_source=request.source
            if request.msg_type is MsgType.TRIGGER_SERVICE4
            else None,
            intended_target=request.target,
            service_and_arg=request.service,
        )

    def command_for(self, request: TriggerRequest, response: PolicyResponse) -> str:
        """``USER:QUBESRPC SERVICE+ARG SOURCE`` for the target (module docstring, step 1)."""
        service = response.service or request.service
        if "+" not in service:
            service += "+"
        source = response.policy_source or self.daemon.config.name
        # build_user_command refuses a user holding ':', which would turn the rest of
        # the line into a shell command for the target agent.
        return build_user_command(response.user or "DEFAULT", build_rpc_command(service, source))

    async def call_vm(self, call: VmCall, response: PolicyResponse) -> None:
        config = self.daemon.config
        assert response.target is not None
        target, target_uuid = response.target, response.target_uuid
        disposable: str | None = None
        if target.startswith(DISPVM_PREFIX):
            base = target[len(DISPVM_PREFIX) :]
            if target_uuid and target_uuid.startswith(DISPVM_PREFIX + "uuid:"):
                base = target_uuid[len(DISPVM_PREFIX) :]
            answer = await admin_call(
                config.qubesd_socket, "admin.vm.CreateDisposable", base, b"uuid"
            )
            disposable = answer.decode("ascii", "replace").strip()
            if not disposable.startswith("uuid:"):
                raise CallFailed(f"qubesd answered {disposable[:80]!r} for a new disposable")
            target, target_uuid = disposable, disposable
            log.info("created disposable %s from %s", disposable, base)
        try:
            daemon = await self.open_target(target, target_uuid, bool(response.autostart))
            try:
                command = self.command_for(call.request, response)
                domain, port = await daemon.exec_cmdline(config.domid, command)
                log.info(
                    "%s: %s -> %s (domain %d port %d): %s",
                    call.request.ident,
                    config.name,
                    target,
                    domain,
                    port,
                    command,
                )
                if not await self.connect(call, domain, port):
                    return
                call.streaming = True
                if disposable is not None:
                    await daemon.wait_closed()
            finally:
                daemon.close()
        finally:
            if disposable is not None:
                await self.kill(disposable)

    async def kill(self, disposable: str) -> None:
        try:
            await admin_call(self.daemon.config.qubesd_socket, "admin.vm.Kill", disposable)
            log.info("killed disposable %s", disposable)
        except PeerError as exc:
            log.error("cannot kill disposable %s: %s", disposable, exc)

    def target_socket(self, target: str, target_uuid: str | None) -> str:
        name = target_uuid if target_uuid and target_uuid.startswith("uuid:") else target
        if not name or "/" in name:
            raise CallFailed(f"policy target {target!r} is not a domain name")
        return os.path.join(self.daemon.config.socket_dir, f"qrexec.{name}")

    async def open_target(
        self, target: str, target_uuid: str | None, autostart: bool
    ) -> TargetDaemon:
        path = self.target_socket(target, target_uuid)
        try:
            return await TargetDaemon.connect(path)
        except OSError as exc:
            if not autostart:
                raise CallFailed(
                    f"target {target} is not running ({exc}); autostart=False"
                ) from None
        dest = target_uuid if target_uuid and target_uuid.startswith("uuid:") else target
        log.info("starting %s for a call (autostart)", target)
        await admin_call(self.daemon.config.qubesd_socket, "admin.vm.Start", dest)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + AUTOSTART_SOCKET_WAIT
        while True:
            try:
                return await TargetDaemon.connect(path)
            except OSError as exc:
                if loop.time() > deadline:
                    raise CallFailed(
                        f"{target} started but its daemon never listened: {exc}"
                    ) from None
            await asyncio.sleep(0.1)

    async def call_dom0(self, call: VmCall, response: PolicyResponse) -> None:
        daemon = self.daemon
        port = daemon.ports.allocate(0)
        if port is None:
            raise CallFailed(f"no free data port for a dom0 call ({len(daemon.ports)} in use)")
        requested = response.requested_target or "dom0"
        target_type, target_name = requested_target_fields(requested)
        service = response.service or call.request.service
        if "+" not in service:
            service += "+"
        source = response.policy_source or daemon.config.name
        command = build_rpc_command(service, source, target_type=target_type, target=target_name)
        if not await self.connect(call, 0, port):
            daemon.ports.release(0, port)
            return
        log.info("%s: %s -> dom0 (port %d): %s", call.request.ident, source, port, command)

        def streaming() -> None:
            call.streaming = True

        code = await run_dom0_service(
            daemon.backend,
            daemon.config.domid,
            port,
            command,
            self.env,
            daemon.config.own_version,
            daemon.config.name,
            hello_timeout=daemon.config.handshake_timeout,
            on_data_phase=streaming,
        )
        log.info("dom0 call %s on port %d finished: %s", call.request.ident, port, code)


async def install(daemon: Daemon) -> None:
    """Enable VM-initiated calls in ``daemon`` (called by :mod:`.cli` when present)."""
    VmCalls(daemon).install()
