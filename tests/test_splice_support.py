"""The once-per-process probe that decides between splicing and copying."""

from __future__ import annotations

import errno
import os

import pytest

from qrexec import splice_support


def test_splice_works_on_this_linux_and_the_answer_is_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert splice_support.splice_works()
    monkeypatch.delattr(os, "splice")
    assert splice_support.splice_works()  # kept until forgotten
    splice_support.forget()
    assert not splice_support.splice_works()


def test_a_kernel_that_refuses_means_copying(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "splice", refuse)
    fds_before = len(os.listdir("/proc/self/fd"))
    assert not splice_support.splice_works()
    assert len(os.listdir("/proc/self/fd")) == fds_before  # the probe closed what it opened
