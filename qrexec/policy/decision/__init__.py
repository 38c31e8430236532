"""The decision service: qrexec-daemon's §6.1 questions answered, asked, notified and audited.

Holds the wire format both sides speak, ``qrexec-policy-daemon``, the ask prompters and the
policy agent, notifications and the audit log. May import :mod:`.engine` and :mod:`.loading`;
never :mod:`.tools`.
"""
