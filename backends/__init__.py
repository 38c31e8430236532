"""Transports: how qrexec bytes move between two domains.

Imported as :mod:`qrexec.backends` (``qrexec/backends`` links here). The interface is in
:mod:`qrexec.backends.base`; the rule that picks a backend is in
:mod:`qrexec.backends.select`. Importing this package imports no backend and no asyncio.
"""
