"""Shared bits of the tool runners (stdlib only: each runner lives in its tool's own venv)."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def parse(description: str, methods: tuple[str, ...]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("case", type=Path, help="case folder written by benchmarks/run.py")
    p.add_argument("out", type=Path, help="output folder for this tool on this case")
    p.add_argument("--method", choices=methods, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def set_thread_env(threads: int) -> None:
    """Must run before the tool's library is imported."""
    for key in ("ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "OMP_NUM_THREADS",
                "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[key] = str(threads)


def write_result(out: Path, **fields) -> None:
    """result.json: wall_s (the registration call only), transforms (applied to fixed points
    first to last), warped_labels (moving labels on the fixed grid, the tool's own resampler)."""
    (out / "result.json").write_text(json.dumps(fields, indent=1))
