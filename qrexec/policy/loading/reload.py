"""Keeping a long-running process's policy current without inotify.

Upstream reloads on inotify events; the standard library has no inotify, and a dependency
for it buys little here. Instead every :meth:`ReloadingPolicy.get_policy` call (i.e. every
request) takes a *fingerprint* (:func:`qrexec.policy.loading.fs_loader.fingerprint`, one ``stat``
per path) of the files and directories the loaded policy was read from (``Policy.sources``,
which includes directories and files that were looked for and missing). A directory's mtime
moves when a file is added, removed or renamed in it, so new policy files are seen too.
Cost: one ``stat`` per source per request (a few µs each), no threads, no polling while
idle, and a change is seen by the very next request — which is what tests and users expect
after an edit.

The one trap is timestamp granularity: the kernel stamps files from a coarse clock, so two
edits of the same size within one tick look identical. Like git's "racily clean" rule, a
fingerprint is not trusted while any source was modified less than :data:`RACY_SECONDS`
ago: the policy is then re-read on the next request as well, until the files settle.

A load that fails (syntax error, bad file name) yields a policy that denies everything; the
error is logged once per change, loudly, and again (as "fixed") once a later edit loads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Final, Protocol

from qrexec.policy.engine.policy import Policy
from qrexec.policy.loading.fs_loader import Fingerprint, fingerprint, newest_change

log = logging.getLogger(__name__)

#: Modifications younger than this may share a timestamp with the next edit.
RACY_SECONDS: Final = 1.0


class PolicySource(Protocol):
    def get_policy(self) -> Policy: ...


class ReloadingPolicy:
    """A :class:`PolicySource` that re-runs ``load`` whenever its sources changed."""

    def __init__(self, load: Callable[[], Policy], *, extra_paths: Iterable[str] = ()) -> None:
        self._load = load
        self._extra = frozenset(extra_paths)
        self._policy: Policy | None = None
        self._fingerprint: Fingerprint | None = None
        self.reloads = 0

    def _paths(self, policy: Policy) -> frozenset[str]:
        return policy.sources | self._extra

    def get_policy(self) -> Policy:
        if self._policy is not None and fingerprint(self._paths(self._policy)) == self._fingerprint:
            return self._policy
        before = self._paths(self._policy) if self._policy is not None else frozenset()
        pre = fingerprint(before)
        policy = self._load()
        after = self._paths(policy)
        # Fingerprint taken *before* reading, when the set of files is unchanged: an edit
        # that races with the load then still differs next time and triggers a reload.
        current = fingerprint(after)
        fp = pre if after == before else current
        racy = time.time_ns() - newest_change(current) < RACY_SECONDS * 1e9
        self._fingerprint = None if racy else fp
        self._report(policy)
        self._policy = policy
        self.reloads += 1
        return policy

    def _report(self, policy: Policy) -> None:
        previous = self._policy
        if policy.error is not None:
            if (
                previous is None
                or previous.error is None
                or str(previous.error) != str(policy.error)
            ):
                log.error(
                    "policy has an error, every call is DENIED until it is fixed: %s",
                    policy.error,
                )
        elif previous is not None and previous.error is not None:
            log.warning("policy fixed: %d rules loaded, calls are evaluated again",
                        len(policy.rules))  # fmt: skip
        elif previous is None or self._fingerprint is not None:
            log.info("policy loaded: %d rules from %d sources", len(policy.rules),
                     len(policy.sources))  # fmt: skip
