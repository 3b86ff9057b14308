"""The README's command-line session runs as printed (on a small phantom)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "run as printed by `tests/test_readme_commands.py`"


def readme_session() -> list[list[str]]:
    """The commands of the README block introduced by :data:`MARKER`, as argument lists."""
    text = README.read_text(encoding="utf-8")
    start = text.index(MARKER)
    block = re.search(r"```bash\n(.*?)```", text[start:], re.DOTALL)
    assert block is not None, "the README's tested session has no bash block"
    lines = block.group(1).replace("\\\n", " ").splitlines()
    commands = [shlex.split(line, comments=True) for line in lines if line.strip()]
    assert all(cmd[0] == "itreg" for cmd in commands if cmd)
    return [cmd[1:] for cmd in commands if cmd]


def test_the_readme_session_runs_as_printed(tmp_path, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    commands = readme_session()
    assert len(commands) >= 4
    for args in commands:
        code, _out, err = cli(args)
        assert code == 0, f"itreg {shlex.join(args)}: {err}"
    report = (tmp_path / "out" / "evaluation.md").read_text()
    assert "Dice" in report or "dice" in report
    # the last command replaced itreg's outputs in out/ and kept the evaluation the user made
    # there with another command
    assert (tmp_path / "out" / "labels_in_fixed.nii.gz").is_file()
