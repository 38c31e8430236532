"""An in-memory policy store, for tests and for evaluating policy text without files.

Files are given as ``{path: text}``; directories exist implicitly as the parents of files
(plus any listed in ``dirs``). Does no I/O.
"""

from __future__ import annotations

import errno
import posixpath
from collections.abc import Iterable, Mapping

from qrexec.policy.engine.policy import Policy
from qrexec.policy.loading.builder import DirEntry, build_policy
from qrexec.policy.loading.paths import PolicyPaths


class MemoryStore:
    """A read-only tree of policy files held in a dict."""

    def __init__(self, files: Mapping[str, str], dirs: Iterable[str] = ()) -> None:
        self.files = {posixpath.normpath(p): t for p, t in files.items()}
        self.dirs: set[str] = {posixpath.normpath(d) for d in dirs}
        for path in self.files:
            parent = posixpath.dirname(path)
            while parent and parent not in self.dirs:
                self.dirs.add(parent)
                if parent == "/":
                    break
                parent = posixpath.dirname(parent)

    def is_dir(self, path: str) -> bool:
        return posixpath.normpath(path) in self.dirs

    def list_dir(self, path: str) -> list[DirEntry]:
        path = posixpath.normpath(path)
        if path not in self.dirs:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        entries = [
            DirEntry(posixpath.basename(f), True)
            for f in self.files
            if posixpath.dirname(f) == path
        ]
        entries += [
            DirEntry(posixpath.basename(d), False)
            for d in self.dirs
            if d != path and posixpath.dirname(d) == path
        ]
        return entries

    def read_text(self, path: str) -> str:
        path = posixpath.normpath(path)
        if path not in self.files:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.files[path]


def load_policy_from_files(
    files: Mapping[str, str], paths: PolicyPaths | None = None, dirs: Iterable[str] = ()
) -> Policy:
    """Build a Policy from in-memory files laid out as ``paths`` describes."""
    return build_policy(MemoryStore(files, dirs), paths or PolicyPaths())


def policy_from_text(text: str, name: str = "/etc/qubes/policy.d/30-test.policy") -> Policy:
    """A Policy made of one modern-format file (the simplest way to test rules)."""
    directory = posixpath.dirname(name)
    return load_policy_from_files({name: text}, PolicyPaths(policy_dirs=(directory,)))
