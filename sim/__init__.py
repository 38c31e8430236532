"""The multi-domain testbed (imported as :mod:`qrexec.sim`)."""
