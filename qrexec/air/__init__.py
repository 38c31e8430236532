"""Qubes Air relaying over OpenSSH: the programs that run in relay qubes.

* :mod:`.proxy` — ``qubesair.SSHProxy``, the transport service dom0 redirects a call for a
  RemoteVM to;
* :mod:`.entry` — the forced command of the relay's sshd, which turns a peer host's request
  into ``qrexec-client-vm --source-qube=…``;
* :mod:`.request` — the pure parsing and checks both share.

Imports only the shared small modules; the testbed that wires hosts together is
:mod:`qrexec.sim.air`.
"""
