"""Turning files into an engine policy: policy.d folders, include rules, the legacy formats.

May import :mod:`qrexec.policy.engine`; never the decision service or the tools.
"""
