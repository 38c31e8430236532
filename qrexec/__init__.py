"""qrexec in Python: the Qubes OS inter-domain RPC system.

The package is split so that pure logic never does I/O:

* :mod:`qrexec.protocol` - message layouts, framing and negotiation (pure);
* :mod:`qrexec.policy` - policy parsing and evaluation (pure core, loaders apart);
* :mod:`qrexec.backends` - transports (unix-socket emulation, Xen vchan, in-memory);
* :mod:`qrexec.daemon`, :mod:`qrexec.agent`, :mod:`qrexec.client` - the programs;
* :mod:`qrexec.sim` - the multi-domain testbed.

Importing this package imports nothing else, so the per-call clients stay lean.
"""

__version__ = "0.1.0"
