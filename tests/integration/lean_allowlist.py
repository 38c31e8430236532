"""Standard-library modules a plain client call may load beyond ``python -c pass``.

Checked by ``test_client_lean_imports.py`` for ``qrexec-client`` and ``qrexec-client-vm``.
What ``python -c 'import socket, struct, select'`` adds is allowed as a whole (every client
must talk over sockets); our own ``qrexec.*`` modules are allowed too. Anything else needs
a line here with the reason it is worth its start-up time.
"""

from __future__ import annotations

#: The baseline every client pays (run with ``python -S``): what a plain ``site`` start
#: loads (``os`` and friends) and sockets, their framing and waiting.
BASELINE = "import os, io, codecs, encodings.utf_8, abc, stat\nimport socket, struct, select"

ALLOWED: dict[str, str] = {
    "__future__": "every module's `from __future__ import annotations` loads this tiny module",
    "signal": "qrexec-client-vm handles SIGUSR1 and SIGPIPE as R4.3 does (spec §15.4); "
    "a thin wrapper over _signal, with enum already loaded by socket",
}
