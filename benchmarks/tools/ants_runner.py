"""ANTsPy `ants.registration` with type_of_transform `Affine` or `SyNOnly` (seeded, no masks).

Runs in its own venv (.venv-ants: antspyx pins numpy<2.4). The forward transforms are
listed as ANTs returns them ([warp, affine] for SyNOnly): a fixed point goes through the
first listed first. Moving labels are warped by ants.apply_transforms (nearestNeighbor).
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, set_thread_env, write_result


def main() -> None:
    args = parse(__doc__.splitlines()[0], ("Affine", "SyNOnly"))
    set_thread_env(args.threads)
    import os

    os.environ["ANTS_RANDOM_SEED"] = str(args.seed)
    import ants

    fixed = ants.image_read(str(args.case / "fixed.nii.gz"))
    moving = ants.image_read(str(args.case / "moving.nii.gz"))
    start = time.perf_counter()
    reg = ants.registration(fixed, moving, type_of_transform=args.method,
                            random_seed=args.seed,  # never 0 here: run.py passes seed + 1
                            outprefix=str(args.out / "ants_"))
    wall = time.perf_counter() - start
    transforms = []
    for i, path in enumerate(reg["fwdtransforms"]):
        src = Path(path)
        suffix = ".nii.gz" if src.name.endswith(".nii.gz") else src.suffix
        dst = args.out / f"fwd{i}{suffix}"
        if src.resolve() != dst.resolve():
            shutil.copyfile(src, dst)
        transforms.append(dst.name)
    labels = ants.image_read(str(args.case / "moving_labels.nii.gz"))
    warped = ants.apply_transforms(fixed, labels, reg["fwdtransforms"],
                                   interpolator="nearestNeighbor")
    ants.image_write(warped.astype("uint8"), str(args.out / "warped_labels.nii.gz"))
    write_result(args.out, wall_s=wall, transforms=transforms,
                 warped_labels="warped_labels.nii.gz",
                 note=f"type_of_transform={args.method}, random_seed={args.seed}")


if __name__ == "__main__":
    main()
