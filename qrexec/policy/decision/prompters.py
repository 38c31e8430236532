"""Choosing a prompter from its command-line spec (``--ask-prompter``, ``--answer``).

Sits above :mod:`.ask` (the prompt, the answer, the simple prompters) and the two prompters
that need more machinery (:mod:`.ask_terminal`, :mod:`.agent_client`), so that none of those
has to import another to be chosen. Starts nothing: it only builds the prompter object.
"""

from __future__ import annotations

from typing import Final

from qrexec.policy.decision.agent_client import PolicyAgentClient, PolicyAskPrompter
from qrexec.policy.decision.ask import DenyPrompter, Prompter, ScriptedPrompter
from qrexec.policy.decision.ask_terminal import TerminalPrompter

PROMPTER_SPECS: Final = "policy-ask | terminal[:TTY] | scripted:FILE | deny"


def make_prompter(
    spec: str, *, agent_socket: str, qrexec_client: str, tty: str = "/dev/tty"
) -> Prompter:
    """Build a prompter from its command-line spec (:data:`PROMPTER_SPECS`)."""
    kind, colon, arg = spec.partition(":")
    if kind == "deny" and not colon:
        return DenyPrompter()
    if kind == "scripted" and arg:
        return ScriptedPrompter(arg)
    if kind == "terminal":
        return TerminalPrompter(arg or tty)
    if kind == "policy-ask" and not colon:
        return PolicyAskPrompter(PolicyAgentClient(agent_socket, qrexec_client))
    raise ValueError(f"unknown prompter {spec!r}; expected {PROMPTER_SPECS}")
