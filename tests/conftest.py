"""Fixtures shared by every test folder (pytest finds them here; never import this module)."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Run a test on one torch thread (2 shared cores, many small tensors), restoring the
    caller's setting afterwards. Folders and modules opt in with ``usefixtures``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def cli(capsys):
    """``cli(args) -> (exit code, stdout, stderr)``: the ``itreg`` console entry point with its
    error policy (itreg errors exit 2 with one line), run in-process."""
    from itreg.cli import main

    def run(args):
        with pytest.raises(SystemExit) as exc:
            main(args)
            raise SystemExit(0)
        out = capsys.readouterr()
        return exc.value.code, out.out, out.err

    return run
