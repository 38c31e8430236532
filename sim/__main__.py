"""``python3 -m qrexec.sim COMMAND``: the same as the ``qrexec-sim`` console script."""

import sys

from qrexec.sim.cli import main

sys.exit(main())
