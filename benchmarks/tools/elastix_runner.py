"""itk-elastix with its default `affine` or `bspline` parameter map (no masks).

The affine result is written as an ITK AffineTransform (.tfm); the B-spline result as a
displacement field on the fixed grid from transformix. Moving labels are warped by transformix
with nearest-neighbour interpolation (FinalBSplineInterpolationOrder 0).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import parse, set_thread_env, write_result


def main() -> None:
    args = parse(__doc__.splitlines()[0], ("affine", "bspline"))
    set_thread_env(args.threads)
    os.chdir(args.out)  # transformix writes deformationField.nii into the working directory
    import itk
    import numpy as np

    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(args.threads)
    fixed = itk.imread(str(args.case / "fixed.nii.gz"), itk.F)
    moving = itk.imread(str(args.case / "moving.nii.gz"), itk.F)
    params = itk.ParameterObject.New()
    params.AddParameterMap(params.GetDefaultParameterMap(args.method))

    start = time.perf_counter()
    method = itk.ElastixRegistrationMethod.New(fixed, moving)
    method.SetParameterObject(params)
    method.SetNumberOfThreads(args.threads)
    method.SetLogToConsole(False)
    method.UpdateLargestPossibleRegion()
    wall = time.perf_counter() - start
    result = method.GetTransformParameterObject()

    last = result.GetParameterMap(result.GetNumberOfParameterMaps() - 1)
    if args.method == "affine" and result.GetNumberOfParameterMaps() == 1:
        import SimpleITK as sitk  # same venv as itreg; only used to write the .tfm file

        p = [float(v) for v in last["TransformParameters"]]
        c = [float(v) for v in last["CenterOfRotationPoint"]]
        tx = sitk.AffineTransform(3)
        tx.SetMatrix(p[:9])
        tx.SetTranslation(p[9:12])
        tx.SetCenter(c)
        sitk.WriteTransform(tx, str(args.out / "transform.tfm"))
        transforms = ["transform.tfm"]
    else:
        field = itk.transformix_deformation_field(moving, result)
        itk.imwrite(field, str(args.out / "displacement.nii.gz"))
        transforms = ["displacement.nii.gz"]

    labels = itk.imread(str(args.case / "moving_labels.nii.gz"), itk.F)
    for i in range(result.GetNumberOfParameterMaps()):
        result.SetParameter(i, "FinalBSplineInterpolationOrder", "0")
    warped = itk.transformix_filter(labels, result)
    arr = np.rint(itk.array_view_from_image(warped)).astype(np.uint8)
    out = itk.image_from_array(arr)
    out.CopyInformation(warped)
    itk.imwrite(out, str(args.out / "warped_labels.nii.gz"))
    write_result(args.out, wall_s=wall, transforms=transforms,
                 warped_labels="warped_labels.nii.gz",
                 note=f"default {args.method} map, {args.threads} thread(s)")


if __name__ == "__main__":
    main()
