"""dom0's policy, in four layers; each subpackage's docstring says what it may import.

* :mod:`.engine` — the pure decision: tokens, rules, parsing, evaluation, system info.
* :mod:`.loading` — policy files and their formats (modern, R4.0, 2011) into an engine policy.
* :mod:`.decision` — the decision service: the §6.1 wire format, qrexec-policy-daemon,
  ask/notify and the audit log.
* :mod:`.tools` — the command-line programs (lint, explain, graph, exec, converters).
"""
