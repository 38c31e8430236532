"""Qubes Air in the testbed: calls between qubes on different hosts, relayed over OpenSSH.

A qube of type ``RemoteVM`` stands for a qube on another host. dom0's policy redirects a call
to it to the local relay qube as ``qubesair.SSHProxy+REMOTE_TARGET+SERVICE+ARG``
(:mod:`qrexec.policy.decision.decide`); the proxy (:mod:`qrexec.air.proxy`) carries the byte
stream over ``ssh`` to the peer host's relay qube, whose forced command
(:mod:`qrexec.air.entry`) validates the request and calls ``qrexec-client-vm
--source-qube=SOURCE TARGET SERVICE+ARG`` there, so the peer's dom0 decides the call as coming
from SOURCE. Those programs live in :mod:`qrexec.air`; the testbed side is here:
:mod:`.air_topology` (several hosts in one file), :mod:`.sshsetup` (keys and configuration),
:mod:`.network` (namespaces or loopback ports) and :mod:`.testbed` (the whole).
"""
