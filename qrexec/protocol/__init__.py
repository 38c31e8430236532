"""The qrexec wire protocol as pure objects: constants, message layouts, framing,
version negotiation and field validation.

Nothing in this package does I/O or imports a module that does (a test enforces it):
bytes go in, messages come out, and the reverse.
"""
