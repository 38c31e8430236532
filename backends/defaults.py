"""Default vchan ring sizes, apart from :mod:`.base` so that the per-call clients can use
them without importing ``typing`` (``base`` declares ``typing.Protocol`` classes)."""

#: Ring sizes a server asks for by default (libvchan rounds up to a power of two).
DEFAULT_READ_MIN = 65536
DEFAULT_WRITE_MIN = 65536
