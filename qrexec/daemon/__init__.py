"""qrexec-daemon: dom0's end of one VM's control channel (asyncio)."""
