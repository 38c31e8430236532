"""Numbers of the qrexec wire protocol: message types, exit codes, ports and size limits.

Values follow real Qubes qrexec (spec §3.2-§3.5, §8). Does no I/O.
"""

from __future__ import annotations

import enum


class MsgType(enum.IntEnum):
    """The ``type`` field of the 8-byte header (spec §3.2)."""

    DATA_STDIN = 0x190
    DATA_STDOUT = 0x191
    DATA_STDERR = 0x192
    DATA_EXIT_CODE = 0x193
    EXEC_CMDLINE = 0x200
    JUST_EXEC = 0x201
    SERVICE_CONNECT = 0x202
    SERVICE_REFUSED = 0x203
    TRIGGER_SERVICE = 0x210
    CONNECTION_TERMINATED = 0x211
    TRIGGER_SERVICE3 = 0x212
    TRIGGER_SERVICE4 = 0x213
    HELLO = 0x300


class ExitCode(enum.IntEnum):
    """Exit codes shared by every qrexec program (spec §8)."""

    OK = 0
    #: The caller's qrexec machinery failed (bad connection, protocol problem...).
    PROBLEM = 125
    #: Policy refused the call.
    REQUEST_REFUSED = 126
    #: The service does not exist in the target.
    SERVICE_NOT_FOUND = 127
    #: ``qrexec-client -c`` to a VM failed (spec §8).
    CONNECT_FAILED = 137


#: Added to a signal number when a process died of a signal.
SIGNAL_EXIT_BASE = 128

#: Protocol versions. v2: R3.0-R4.0, v3: R4.1/R4.2, v4: R4.3+.
PROTOCOL_V2 = 2
PROTOCOL_V3 = 3
PROTOCOL_V4 = 4
MIN_PROTOCOL_VERSION = PROTOCOL_V2
MAX_PROTOCOL_VERSION = PROTOCOL_V4
#: The version offered on the daemon's unix socket (R4.2 demands exactly 3).
CLIENT_SOCKET_PROTOCOL_VERSION = 3
#: Environment variable that caps our own protocol version (for testing v2/v3 peers).
PROTOCOL_VERSION_ENV = "QREXEC_PROTOCOL_VERSION"

HEADER_SIZE = 8
#: Largest DATA_* payload per negotiated version.
MAX_DATA_CHUNK_V2 = 4096
MAX_DATA_CHUNK_V3 = 65536

#: A client's command line: total hdr.len at most this (spec §3.3).
MAX_CMDLINE_LEN = 65535
#: The service name after the v3/v4 trigger prefix (spec §3.3).
MAX_SERVICE_NAME_LEN = 65000
#: NAME_MAX: longest service file name looked up as such (spec §3.3, §7).
MAX_SERVICE_FILE_NAME = 255

#: Fixed-size fields (bytes, including the NUL padding).
IDENT_SIZE = 32
V2_SERVICE_NAME_SIZE = 64
V2_TARGET_DOMAIN_SIZE = 32
V3_TARGET_DOMAIN_SIZE = 64
V4_SOURCE_DOMAIN_SIZE = 64

#: Control vchan port and its ring sizes.
VCHAN_CONTROL_PORT = 512
#: Xen domain ids are 16 bits; ids from 0x7FF0 (DOMID_FIRST_RESERVED) up name no domain.
MAX_DOMAIN_ID = 0x7FEF
#: vchan ports are 16 bits on every transport (the wire carries 32).
MAX_VCHAN_PORT = 0xFFFF
VCHAN_CONTROL_RING_SIZE = 4096
#: Data ports: 256 slots, slot i is port VCHAN_BASE_DATA_PORT + i.
VCHAN_BASE_DATA_PORT = 513
MAX_DATA_PORTS = 256
VCHAN_LAST_DATA_PORT = VCHAN_BASE_DATA_PORT + MAX_DATA_PORTS - 1
#: Default ring size for data vchans (64 KiB each way).
VCHAN_DATA_RING_SIZE = 65536

#: At most this many VM-initiated requests wait for policy per VM.
MAX_PENDING_REQUESTS = 256
