"""Running a qrexec service: lookup, rpc-config, user switching, launching, stdio relay.

Shared by the agent (calls from dom0), the daemon (VM → dom0 calls) and ``qrexec-client``
(dom0-local services), so none of those program packages has to import another. May import
:mod:`qrexec.protocol`, :mod:`qrexec.backends` and the shared small modules; never a program
package (:mod:`qrexec.agent`, :mod:`qrexec.daemon`, :mod:`qrexec.client`) or the policy.
"""
