"""qrexec-agent: the VM side that runs commands and services (asyncio)."""
