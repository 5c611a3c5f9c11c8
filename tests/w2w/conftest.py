"""Fixtures shared by the W2W tests."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def evict():
    """A function that drops a file from the page cache (a tmpfs file stays: it lives there)."""

    def drop(path: str | os.PathLike) -> None:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)

    return drop
