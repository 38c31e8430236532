"""Client of the policy agent (policy.Ask / policy.Notify socket services in a GuiVM).

Where the call goes depends on the GuiVM of the calling qube (spec §6.4). When it is dom0
the agent's socket is on this host (``--policy-agent-socket``, default
``/var/run/qubes/policy-agent.sock``, the socket that dom0's ``/etc/qubes-rpc/policy.Ask`` and
``policy.Notify`` point to) and is called directly, with the dom0 form of the service
descriptor. For any other GuiVM the call goes through ``qrexec-client -d GUIVM
DEFAULT:QUBESRPC SERVICE dom0``. Neither path decides anything:
answers are validated by :func:`qrexec.policy.decision.ask.parse_ask_answer`.
"""

from __future__ import annotations

import logging
from typing import Final

from qrexec.policy.decision.ask import MAX_ANSWER_BYTES, AskPrompt
from qrexec.policy.decision.socket_service import (
    ServiceDescriptor,
    call_local_socket_service,
    call_via_qrexec_client,
    qrexec_client_command,
)

log = logging.getLogger(__name__)

DEFAULT_AGENT_SOCKET: Final = "/var/run/qubes/policy-agent.sock"
DEFAULT_QREXEC_CLIENT: Final = "qrexec-client"


class PolicyAgentClient:
    """Calls a policy agent service in a GuiVM and returns its reply bytes."""

    def __init__(
        self, agent_socket: str = DEFAULT_AGENT_SOCKET, qrexec_client: str = DEFAULT_QREXEC_CLIENT
    ) -> None:
        self.agent_socket = agent_socket
        self.qrexec_client = qrexec_client

    def command_for(self, guivm: str, service: str) -> list[str]:
        """The qrexec-client command used for a GuiVM other than dom0."""
        return qrexec_client_command(self.qrexec_client, guivm, service)

    async def call(self, guivm: str, service: str, body: bytes, *, max_reply: int) -> bytes:
        if guivm == "dom0":
            # As qrexec-client does for a dom0-local call: dom0 is both caller and target.
            descriptor = ServiceDescriptor(
                service, "", "dom0", "keyword", "adminvm", has_plus=False
            )
            return await call_local_socket_service(
                self.agent_socket, descriptor, body, max_reply=max_reply
            )
        return await call_via_qrexec_client(
            self.command_for(guivm, service), body, max_reply=max_reply
        )


class PolicyAskPrompter:
    """The ``policy-ask`` prompter: asks the GuiVM's policy agent (spec §6.4)."""

    def __init__(self, client: PolicyAgentClient) -> None:
        self.client = client

    async def ask(self, prompt: AskPrompt, guivm: str) -> bytes:
        return await self.client.call(
            guivm, "policy.Ask", prompt.to_json(), max_reply=MAX_ANSWER_BYTES
        )
