"""Run a command and write its peak resident memory (MB) to a file: measure.py OUT -- CMD...

A lean launcher: on Linux a child's ru_maxrss starts from the RSS of the process it was forked
from, so tools are not forked straight from the (large) benchmark process but from this one.
"""

import json
import os
import subprocess
import sys


def main() -> int:
    out, sep, cmd = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--" and cmd
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    rc = os.waitstatus_to_exitcode(status)
    with open(out, "w") as f:
        json.dump({"rc": rc, "peak_mb": usage.ru_maxrss / 1024.0}, f)
    return rc if rc >= 0 else 128 - rc


if __name__ == "__main__":
    sys.exit(main())
