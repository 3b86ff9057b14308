"""Run-time settings shared by the API, the training loops and the CLI.

:func:`limited_threads` sets torch's number of CPU threads for a block and restores it after,
so that a ``threads=`` option never changes the caller's setting (no hidden global state).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from itreg.errors import ConfigError

__all__ = ["limited_threads"]


@contextlib.contextmanager
def limited_threads(threads: int | None) -> Iterator[None]:
    """Use `threads` CPU threads inside the block (None: leave the setting alone).

    Raises:
        ConfigError: `threads` is not a positive integer.
    """
    if threads is None:
        yield
        return
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be a positive integer, got {threads!r}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)
