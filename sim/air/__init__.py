"""Qubes Air in the testbed: calls between qubes on different hosts, relayed over OpenSSH.

A qube of type ``RemoteVM`` stands for a qube on another host. dom0's policy redirects a call
to it to the local relay qube as ``qubesair.SSHProxy+REMOTE_TARGET+SERVICE+ARG``
(:mod:`qrexec.policy.decision.decide`); the proxy (:mod:`.proxy`) carries the byte stream over
``ssh`` to the peer host's relay qube, whose forced command (:mod:`.entry`) validates the
request and calls ``qrexec-client-vm --source-qube=SOURCE TARGET SERVICE+ARG`` there, so the
peer's dom0 decides the call as coming from SOURCE. :mod:`.request` holds the pure parsing
both ends share, :mod:`.air_topology` the multi-host topology, :mod:`.sshsetup` keys and
configuration, :mod:`.network` the namespaces or loopback ports, :mod:`.testbed` the whole.
"""
