"""Loading policy from the real filesystem, and noticing when it changed.

The loading logic is in :mod:`qrexec.policy.loading.builder`; this module only supplies the file
access (:class:`FilesystemStore`) and a cheap change check: a policy remembers every file and
directory it was read from (``Policy.sources``), and :func:`fingerprint` stats just those. A
directory's mtime changes when an entry is added, removed or renamed, a file's when it is
edited, so comparing fingerprints tells a daemon when to reload without re-parsing anything.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from qrexec.policy.engine.policy import Policy
from qrexec.policy.loading.builder import DirEntry, build_policy
from qrexec.policy.loading.paths import PolicyPaths

#: Per path: (mtime_ns, ctime_ns, size, inode, mode), or None when it is missing.
Stamp = tuple[int, int, int, int, int] | None
Fingerprint = tuple[tuple[str, Stamp], ...]


class FilesystemStore:
    """PolicyStore over the real filesystem (symlinks followed, as upstream does)."""

    def is_dir(self, path: str) -> bool:
        return os.path.isdir(path)

    def list_dir(self, path: str) -> list[DirEntry]:
        with os.scandir(path) as it:
            return [DirEntry(e.name, _is_regular(e)) for e in it]

    def read_text(self, path: str) -> str:
        with open(path, encoding="utf-8") as f:
            return f.read()


def _is_regular(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_file(follow_symlinks=True)
    except OSError:
        return False


def fingerprint(paths: Iterable[str]) -> Fingerprint:
    """Stat of every path (None if missing): equal fingerprints mean nothing changed.

    The ctime moves with any change to the inode (a chmod, an edit that keeps the mtime),
    the inode with a file replaced by a rename.
    """
    result: list[tuple[str, Stamp]] = []
    for path in sorted(paths):
        try:
            st = os.stat(path)
        except OSError:
            result.append((path, None))
            continue
        stamp = (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino, st.st_mode)
        result.append((path, stamp))
    return tuple(result)


def newest_change(fp: Fingerprint) -> int:
    """The newest mtime or ctime (ns) in a fingerprint; 0 when every path is missing."""
    return max((max(s[0], s[1]) for _, s in fp if s is not None), default=0)


def load_policy(paths: PolicyPaths) -> Policy:
    """Read the policy of one dom0 from disk (a broken policy denies everything)."""
    return build_policy(FilesystemStore(), paths)


class FilesystemPolicyLoader:
    """Keeps a loaded policy and reloads it when one of its sources changed.

    ``policy`` always holds the current policy; ``reload_if_changed()`` is cheap when nothing
    changed (one stat per source).
    """

    def __init__(self, paths: PolicyPaths) -> None:
        self.paths = paths
        self.policy = load_policy(paths)
        self._fingerprint = fingerprint(self.policy.sources)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> FilesystemPolicyLoader:
        return cls(PolicyPaths.from_env(env))

    def fingerprint(self) -> Fingerprint:
        """The current fingerprint of the loaded policy's sources."""
        return fingerprint(self.policy.sources)

    def changed(self) -> bool:
        return fingerprint(self.policy.sources) != self._fingerprint

    def reload(self) -> Policy:
        """Re-read unconditionally."""
        self.policy = load_policy(self.paths)
        self._fingerprint = fingerprint(self.policy.sources)
        return self.policy

    def reload_if_changed(self) -> bool:
        """Reload when a source changed; True if it did."""
        if not self.changed():
            return False
        self.reload()
        return True
