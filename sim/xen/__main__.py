"""``python3 -m qrexec.sim.xen``: run the real-Xen job (see :mod:`qrexec.sim.xen.job`)."""

import sys

from qrexec.sim.xen.job import main

sys.exit(main())
