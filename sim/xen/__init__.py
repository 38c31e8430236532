"""The real-Xen job: Debian's Xen 4.17 under QEMU (TCG) running this project over vchan.

Host side: :mod:`job` (stages), :mod:`host` (packages, debootstrap), :mod:`images` (cpio),
:mod:`boot` (QEMU, markers). Guest side (runs inside the emulated domains with Debian's
python3): :mod:`guest_dom0`, :mod:`guest_domu`, :mod:`guest_qrexec`, :mod:`guest_common`,
:mod:`guest_services`.
"""
