"""The policy engine: qube tokens, rules, the modern parser, evaluation, system info.

Pure logic on values (text in, rules and resolutions out). It imports only the standard
library and :mod:`qrexec.errors` — nothing from the other policy subpackages, nothing that
does I/O on sockets or processes. Loading files is :mod:`qrexec.policy.loading`'s job.
"""
