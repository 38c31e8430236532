"""The per-call clients (qrexec-client, qrexec-client-vm): blocking, no asyncio."""
