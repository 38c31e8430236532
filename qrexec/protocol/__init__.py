"""The qrexec wire protocol as pure objects: constants, message layouts (messages),
framing with length caps (framing), HELLO negotiation (negotiation), validation of
untrusted fields and trigger conversions (fields), command-line strings (cmdline).

Nothing in this package does I/O or imports a module that does (a test enforces it):
bytes go in, messages come out, and the reverse.
"""
