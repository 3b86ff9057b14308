"""ITK transform files and displacement-field images.

itreg's transforms use ITK's convention (a transform maps fixed-space world points to
moving-space world points, LPS mm) and its linear parameterisation
``T(x) = A (x - c) + c + t``, so they go to and from ITK files without conversion:

* :func:`write_transform` writes linear transforms as ``AffineTransform_double_D_D`` (parameters:
  the matrix row-major then the translation; fixed parameters: the centre), the type
  ``SimpleITK.ReadTransform``, ANTs / ANTsPy (``ants.read_transform``) and 3D Slicer read.
  Cubic B-spline FFDs become ``BSplineTransform_double_D_D`` (order 3), displacement fields
  ``DisplacementFieldTransform`` (on their own grid, exactly), and compositions of those an ITK
  ``CompositeTransform`` (.h5 or .tfm) in the same order.
* :func:`read_transform` reads files written by itreg, SimpleITK, ANTs, elastix's ITK export or
  Slicer: every linear type (Affine, MatrixOffsetTransformBase, Euler, Similarity, Versor,
  Translation, Scale, ...), composites, displacement fields and B-splines.
* :func:`write_displacement_field` / :func:`read_displacement_field` exchange any transform as a
  vector image of ``d(x) = T(x) - x`` on a grid, which ``SimpleITK.DisplacementFieldTransform``
  and ANTs apply as is.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from itreg.errors import (
    GeometryError,
    ImageFormatError,
    ImageReadError,
    InvalidImageError,
    TransformFileError,
)
from itreg.grid import Grid
from itreg.image import Image
from itreg.io._native import (
    atomic_write,
    check_input_file,
    full_suffix,
    quiet_native_stderr,
    sitk_message,
)
from itreg.io.images import compression_mode, from_sitk, read_image, write_sitk_image
from itreg.transforms.base import Transform
from itreg.transforms.linear import Affine, LinearTransform

logger = logging.getLogger("itreg.io")

#: Extensions written and read as ITK transform files (anything else is tried as an image).
TRANSFORM_SUFFIXES = (".tfm", ".txt", ".h5", ".hdf5", ".hdf", ".mat", ".xfm")

_WRITE_HINT = "use .tfm, .txt, .h5 or .mat (ANTs' format)"
_MAX_COMPOSITE_DEPTH = 16


def is_transform_path(path: str | os.PathLike) -> bool:
    """Whether `path` has an ITK transform file extension (see :data:`TRANSFORM_SUFFIXES`)."""
    return full_suffix(path) in TRANSFORM_SUFFIXES


# ---------------------------------------------------------------------------------- writing
def _as_linear(transform: Transform, depth: int = 0):
    """``(A, t, c)`` float64 arrays of a linear itreg transform, or None if not linear."""
    if isinstance(transform, LinearTransform):
        with torch.no_grad():
            a = transform.matrix().detach().to("cpu", torch.float64).numpy()
            t = transform.translation.detach().to("cpu", torch.float64).numpy()
            c = transform.center.detach().to("cpu", torch.float64).numpy()
        return a, t, c
    if not getattr(transform, "is_linear", False):
        return None
    if hasattr(transform, "linear_part") and depth < _MAX_COMPOSITE_DEPTH:
        part = transform.linear_part()
        if part is not None and part is not transform:
            return _as_linear(part, depth + 1)
    # Any other linear map (Identity, ...): probe it at 0 and at the unit vectors.
    d = transform.ndim
    probe = torch.cat([torch.zeros(1, d, dtype=torch.float64), torch.eye(d, dtype=torch.float64)])
    with torch.no_grad():
        mapped = transform(probe).detach().to("cpu", torch.float64).numpy()
    offset = mapped[0]
    a = (mapped[1:] - offset).T
    return a, offset, np.zeros(d)


def _to_sitk_transform(transform: Transform, path: Path, depth: int = 0) -> sitk.Transform:
    linear = _as_linear(transform)
    if linear is not None:
        a, t, c = linear
        if not (np.isfinite(a).all() and np.isfinite(t).all() and np.isfinite(c).all()):
            raise TransformFileError(
                f"cannot write transform {str(path)!r}: the {type(transform).__name__} has "
                "NaN/Inf parameters"
            )
        d = a.shape[0]
        out = sitk.AffineTransform(d)
        out.SetMatrix([float(v) for v in a.ravel()])
        out.SetTranslation([float(v) for v in t])
        out.SetCenter([float(v) for v in c])
        return out
    if hasattr(transform, "to_itk_parameters"):
        fixed, params = transform.to_itk_parameters()
        if not np.isfinite(np.asarray(params, dtype=np.float64)).all():
            raise TransformFileError(
                f"cannot write transform {str(path)!r}: the {type(transform).__name__} has "
                "NaN/Inf coefficients"
            )
        out = sitk.BSplineTransform(transform.ndim, 3)
        out.SetFixedParameters([float(v) for v in fixed])
        out.SetParameters([float(v) for v in params])
        return out
    from itreg.transforms.compose import Compose
    from itreg.transforms.dense import DisplacementField

    if isinstance(transform, DisplacementField):  # exact: the field on its own grid
        return sitk.DisplacementFieldTransform(_field_image(
            torch.movedim(transform.field.detach(), 0, -1), transform.grid, torch.float64, path))
    if isinstance(transform, Compose) and len(transform) > 0 and depth < _MAX_COMPOSITE_DEPTH:
        # ITK's CompositeTransform applies its last transform first, as Compose does.
        return sitk.CompositeTransform(
            [_to_sitk_transform(t, path, depth + 1) for t in transform.transforms])
    raise TransformFileError(
        f"cannot write a {type(transform).__name__} to the ITK transform file {str(path)!r}: it "
        "has no ITK transform type (itreg writes linear transforms, B-splines, displacement "
        "fields and compositions of those); export it as a displacement field with "
        "itreg.io.write_displacement_field(transform, grid, path)"
    )


def write_transform(transform: Transform, path: str | os.PathLike) -> Path:
    """Write a transform to an ITK transform file (.tfm, .txt, .h5, .mat).

    Linear transforms (:class:`~itreg.transforms.LinearTransform`, or a linear composition
    with ``linear_part()``) become ``AffineTransform_double_D_D`` with fixed parameters = the
    centre and parameters = the matrix (row-major) then the translation: exactly itreg's
    ``T(x) = A (x - c) + c + t``. ``SimpleITK.ReadTransform`` reads the file unchanged; ANTs and
    ANTsPy read ``AffineTransform_double`` files (.mat, .txt, .tfm) as their own affine type;
    3D Slicer loads them as a linear transform (ITK's fixed-to-moving "resampling" direction).
    Transforms with ``to_itk_parameters()`` (cubic B-splines) become ``BSplineTransform``,
    :class:`~itreg.transforms.dense.DisplacementField` becomes ``DisplacementFieldTransform``
    on its own grid, and a non-linear :class:`~itreg.transforms.Compose` of those becomes a
    ``CompositeTransform`` (ITK applies its last transform first, as Compose does). The file is
    written under a temporary name and renamed into place.

    Args:
        transform: the transform (fixed -> moving world points).
        path: output file; the extension picks the format.

    Returns:
        The path written.

    Raises:
        TransformFileError: a transform with no ITK file type (velocity fields and other
            non-linear maps: use :func:`write_displacement_field`), NaN parameters, or an
            extension SimpleITK does not write.
    """
    target = Path(path)
    out = _to_sitk_transform(transform, target)
    if target.is_dir():
        raise TransformFileError(f"cannot write transform to {str(target)!r}: it is a directory")
    try:
        with atomic_write(target) as tmp, quiet_native_stderr():
            sitk.WriteTransform(out, str(tmp))
    except RuntimeError as exc:
        raise TransformFileError(
            f"cannot write transform {str(target)!r}: {sitk_message(exc)}; {_WRITE_HINT}, and "
            "check the folder is writable"
        ) from exc
    logger.debug("wrote %s: %s", target, out.GetName())
    return target


# ---------------------------------------------------------------------------------- reading
def _center_of(tx: sitk.Transform, d: int) -> np.ndarray | None:
    """Centre of rotation of one ITK transform, where it has one."""
    typed = tx.Downcast()
    if hasattr(typed, "GetCenter") and not isinstance(typed, sitk.CompositeTransform):
        return np.asarray(typed.GetCenter(), dtype=np.float64)
    fixed = tx.GetFixedParameters()
    if len(fixed) == d:  # MatrixOffsetTransformBase and other untyped linear transforms
        return np.asarray(fixed, dtype=np.float64)
    return None


def _linear_from_sitk(tx: sitk.Transform, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(A, offset, centre)`` of a linear ITK transform, ``T(x) = A x + offset``."""
    zero = np.asarray(tx.TransformPoint((0.0,) * d), dtype=np.float64)
    typed = tx.Downcast()
    if hasattr(typed, "GetMatrix") and not isinstance(typed, sitk.CompositeTransform):
        a = np.asarray(typed.GetMatrix(), dtype=np.float64).reshape(d, d)
    else:  # probe: columns are the images of the unit vectors
        a = np.stack(
            [np.asarray(tx.TransformPoint(tuple(np.eye(d)[i])), dtype=np.float64) - zero
             for i in range(d)],
            axis=1,
        )
    center = _center_of(tx, d)
    if center is None and isinstance(typed, sitk.CompositeTransform):
        for i in range(typed.GetNumberOfTransforms()):
            center = _center_of(typed.GetNthTransform(i), d)
            if center is not None:
                break
    return a, zero, np.zeros(d) if center is None else center


def _affine(parts, dtype, device) -> Affine:
    a, off, c = parts
    return Affine.from_matrix(a, off, c, dtype=dtype, device=device)


def _from_sitk_transform(tx: sitk.Transform, where: str, dtype, device, depth: int = 0):
    d = tx.GetDimension()
    if d not in (2, 3):
        raise TransformFileError(f"{where} is {d}D; itreg transforms are 2D or 3D")
    if tx.IsLinear():
        a, off, c = _linear_from_sitk(tx, d)
        if not (np.isfinite(a).all() and np.isfinite(off).all() and np.isfinite(c).all()):
            raise TransformFileError(f"{where} has NaN/Inf parameters")
        _check_invertible(a, where)
        return _affine((a, off, c), dtype, device)
    typed = tx.Downcast()
    kind = tx.GetTransformEnum()
    if kind == sitk.sitkDisplacementField:
        field = typed.GetDisplacementField()
        return _field_transform(from_sitk(field, dtype=dtype, name=where), where, device)
    if kind == sitk.sitkBSplineTransform:
        from itreg.transforms.bspline import BSpline

        if not (np.isfinite(np.asarray(tx.GetParameters(), np.float64)).all()
                and np.isfinite(np.asarray(tx.GetFixedParameters(), np.float64)).all()):
            raise TransformFileError(f"{where} has NaN/Inf B-spline parameters")

        order = typed.GetOrder() if hasattr(typed, "GetOrder") else 3
        if order != 3:
            raise TransformFileError(
                f"{where} is a B-spline of order {order}; itreg's FFD is cubic (order 3)"
            )
        try:
            return BSpline.from_itk_parameters(tx.GetFixedParameters(), tx.GetParameters(),
                                               dtype=dtype, device=device)
        except TransformFileError as exc:
            raise TransformFileError(f"{where}: {exc}") from exc
    if kind == sitk.sitkComposite and depth < _MAX_COMPOSITE_DEPTH:
        n = typed.GetNumberOfTransforms()
        if n == 0:
            raise TransformFileError(f"{where} is an empty composite transform")
        parts: list = []  # itreg transforms or (A, off, c) tuples of consecutive linear ones
        for i in range(n):
            sub = typed.GetNthTransform(i)
            if sub.IsLinear():
                lin = _linear_from_sitk(sub, d)
                if not all(np.isfinite(v).all() for v in lin):
                    raise TransformFileError(f"{where} has NaN/Inf parameters (transform {i})")
                _check_invertible(lin[0], f"{where} (transform {i})")
                if parts and isinstance(parts[-1], tuple):
                    # Compose(p, q)(x) = p(q(x)): A = Ap Aq, off = Ap off_q + off_p.
                    ap, offp, cp = parts[-1]
                    parts[-1] = (ap @ lin[0], ap @ lin[1] + offp, cp)
                else:
                    parts.append(lin)
            else:
                parts.append(_from_sitk_transform(sub, where, dtype, device, depth + 1))
        parts = [_affine(p, dtype, device) if isinstance(p, tuple) else p for p in parts]
        if len(parts) == 1:
            return parts[0]
        from itreg.transforms.compose import Compose

        # ITK applies the last transform of a composite first, as Compose does.
        return Compose(*parts)
    raise TransformFileError(
        f"{where} holds an ITK {tx.GetName()} that itreg does not read; supported: linear "
        "transforms (affine, rigid, similarity, versor, translation, scale), B-splines, "
        "displacement fields and composites of those"
    )


def read_transform(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                   device=None) -> Transform:
    """Read an ITK transform file written by itreg, SimpleITK, ANTs, elastix or 3D Slicer.

    Linear types of any ITK class (``AffineTransform``, ``MatrixOffsetTransformBase`` as ANTs
    writes, ``Euler2D/3D``, ``Similarity2D/3D``, ``VersorRigid3D``, ``ScaleSkewVersor3D``,
    ``TranslationTransform``, ``ScaleTransform``, ...) become an
    :class:`~itreg.transforms.Affine` with the file's centre. A composite of linear
    transforms becomes one Affine; ``DisplacementFieldTransform`` becomes a
    :class:`~itreg.transforms.dense.DisplacementField`, ``BSplineTransform`` a
    :class:`~itreg.transforms.bspline.BSpline`; other composites become
    :class:`~itreg.transforms.Compose` in ITK order (the last listed applies first).
    Displacement-field *images* (.nii.gz, .nrrd, .mha, as ANTs writes its warps) are read with
    :func:`read_displacement_field`.

    Args:
        path: the transform file.
        dtype: dtype of the returned transform's parameters.
        device: device of the returned transform's parameters.

    Returns:
        The transform, mapping fixed-space world points to moving-space world points.

    Raises:
        TransformFileError: the file is missing, a directory, not an ITK transform file, or
            holds a transform type itreg does not read.
    """
    p = check_input_file(path, "transform file", TransformFileError)
    if not is_transform_path(p) and _looks_like_image(p):
        return read_displacement_field(p, dtype=dtype, device=device)
    _check_text_transform(p)
    try:
        with quiet_native_stderr():
            tx = sitk.ReadTransform(str(p))
    except RuntimeError as exc:
        raise TransformFileError(
            f"cannot read transform file {str(p)!r}: {sitk_message(exc)}; expected an ITK "
            "transform file (.tfm, .txt, .h5, .mat) as itreg, SimpleITK or ANTs write"
        ) from exc
    transform = _from_sitk_transform(tx, f"transform file {str(p)!r}", dtype, device)
    logger.debug("read %s: %s -> %s", p, tx.GetName(), type(transform).__name__)
    return transform


#: ITK types whose FixedParameters line may be empty (they have no centre or grid).
_NO_FIXED_PARAMETERS = ("TranslationTransform", "IdentityTransform", "CompositeTransform")

#: Largest text transform file checked line by line before SimpleITK reads it (bytes).
_MAX_TEXT_CHECK = 512 * 2**20


def _check_text_transform(path: Path) -> None:
    """Refuse a text transform file (.tfm, .txt) that SimpleITK would read wrongly.

    SimpleITK fills a missing ``FixedParameters`` line with zeros (an affine then loses its
    centre, and with it the translation it stands for) and refuses NaN with a message about
    the parameter count; both are caught here with a message that names the file and block.
    """
    if full_suffix(path) not in (".tfm", ".txt") or path.stat().st_size > _MAX_TEXT_CHECK:
        return
    try:
        text = path.read_text(encoding="ascii")
    except (UnicodeDecodeError, OSError):
        return  # not a text transform file: SimpleITK's reader says what is wrong
    if not text.lstrip().startswith("#Insight Transform File"):
        return
    blocks: list[dict] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "Transform":
            blocks.append({"type": value.strip(), "line": lineno})
        elif key in ("Parameters", "FixedParameters") and blocks:
            try:
                values = np.asarray([float(v) for v in value.split()], dtype=np.float64)
            except ValueError:
                raise TransformFileError(
                    f"transform file {str(path)!r}, line {lineno}: {key} holds a non-number; "
                    "the file is corrupt, write it again"
                ) from None
            if not np.isfinite(values).all():
                raise TransformFileError(
                    f"transform file {str(path)!r}, line {lineno}: {key} of "
                    f"{blocks[-1]['type']} holds {int((~np.isfinite(values)).sum())} NaN/Inf "
                    "value(s); the transform is unusable, recompute it"
                )
            blocks[-1][key] = values.size
    for block in blocks:
        name = block["type"]
        if name.startswith(_NO_FIXED_PARAMETERS):
            continue
        if "FixedParameters" not in block or block["FixedParameters"] == 0:
            raise TransformFileError(
                f"transform file {str(path)!r}, line {block['line']}: {name} has no "
                "FixedParameters (its centre or grid), which SimpleITK would fill with "
                "zeros and so misread the transform; add the 'FixedParameters:' line"
            )
        if "Parameters" not in block:
            raise TransformFileError(
                f"transform file {str(path)!r}, line {block['line']}: {name} has no "
                "Parameters line; the file is truncated"
            )


def _check_invertible(a: np.ndarray, where: str) -> None:
    """Refuse a singular (or all-zero) linear part: it collapses space onto a plane or point."""
    s = np.linalg.svd(a, compute_uv=False)
    if s[0] == 0 or s[-1] <= 1e-10 * s[0]:
        raise TransformFileError(
            f"{where} has a singular matrix (singular values "
            f"{', '.join(f'{v:.3g}' for v in s)}): it maps space onto a "
            f"{'point' if s[0] == 0 else 'plane or line'} and has no inverse; recompute or "
            "replace the transform"
        )


def _looks_like_image(path: Path) -> bool:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        with quiet_native_stderr():
            reader.ReadImageInformation()
    except RuntimeError:
        return False
    return True


# ---------------------------------------------------------------------------------- fields
def _field_transform(image: Image, where: str, device=None):
    from itreg.transforms.dense import DisplacementField

    d = image.grid.ndim
    if image.channels != d:
        raise TransformFileError(
            f"{where} has {image.channels} component(s) per voxel but a {d}D displacement field "
            f"needs {d} (x, y[, z] in world mm); give a vector image of displacements"
        )
    if not image.data.is_floating_point():
        image = image.float()
    bad = int((~torch.isfinite(image.data)).sum())
    if bad:
        raise TransformFileError(f"{where} has {bad} NaN/Inf displacement values")
    return DisplacementField(image.data.to(device=device), image.grid)


def _field_image(disp: torch.Tensor, grid: Grid, dtype: torch.dtype, path: Path) -> sitk.Image:
    """SimpleITK vector image of displacements ``(*grid.shape, D)`` on `grid`."""
    disp = disp.detach().to("cpu", dtype)
    bad = int((~torch.isfinite(disp)).sum())
    if bad:
        raise TransformFileError(
            f"cannot write displacement field {str(path)!r}: {bad} displacement values are "
            "NaN/Inf"
        )
    field = sitk.GetImageFromArray(disp.numpy(), isVector=True)
    field.SetSpacing(grid.spacing)
    field.SetOrigin(grid.origin)
    field.SetDirection(grid.direction)
    return field


def write_displacement_field(transform: Transform, grid: Grid, path: str | os.PathLike, *,
                             dtype: torch.dtype = torch.float32,
                             compress: bool | str = True) -> Path:
    """Write a transform as a displacement field ``d(x) = T(x) - x`` sampled on `grid`.

    Image extensions (.nii.gz, .nii, .nrrd, .mha) give a vector image with D components in
    world mm (LPS) on `grid`; ``sitk.DisplacementFieldTransform(sitk.ReadImage(path,
    sitk.sitkVectorFloat64))`` applies it as is, and ANTs reads it as a warp. Transform
    extensions (.h5, .tfm) give an ITK ``DisplacementFieldTransform`` file.

    Args:
        transform: any itreg transform (fixed -> moving).
        grid: the fixed grid to sample it on.
        path: output file.
        dtype: ``torch.float32`` (default) or ``torch.float64`` voxels.
        compress: image extensions' compression, as :func:`itreg.io.write_image` takes it
            (``"fast"``/True, ``"best"``, ``"none"``/False).

    Returns:
        The path written.

    Raises:
        TransformFileError: NaN/Inf displacements, a dimension mismatch, or an extension
            SimpleITK cannot write.
        ConfigError: an unknown `compress` value.
    """
    target = Path(path)
    compression_mode(compress)
    if dtype not in (torch.float32, torch.float64):
        raise TransformFileError(
            f"displacement field {str(target)!r}: dtype must be torch.float32 or torch.float64, "
            f"got {dtype}"
        )
    if transform.ndim != grid.ndim:
        raise TransformFileError(
            f"cannot write displacement field {str(target)!r}: the transform is {transform.ndim}D "
            f"but the grid is {grid.ndim}D"
        )
    # Linear maps are evaluated in float64 so the field is exact to float32 rounding.
    eval_dtype = torch.float64 if getattr(transform, "is_linear", False) else None
    with torch.no_grad():
        disp = transform.displacement(grid, dtype=eval_dtype)
    field = _field_image(disp, grid, dtype, target)
    if target.is_dir():
        raise TransformFileError(f"cannot write displacement field to {str(target)!r}: it is a "
                                 "directory")
    try:
        with atomic_write(target) as tmp, quiet_native_stderr():
            if is_transform_path(target):
                sitk.WriteTransform(sitk.DisplacementFieldTransform(
                    sitk.Cast(field, sitk.sitkVectorFloat64)), str(tmp))
            else:
                write_sitk_image(field, tmp, target, compress)
    except RuntimeError as exc:
        raise TransformFileError(
            f"cannot write displacement field {str(target)!r}: {sitk_message(exc)}; use an image "
            "extension (.nii.gz, .nrrd, .mha) or .h5, and check the folder is writable"
        ) from exc
    logger.debug("wrote displacement field %s on %r", target, grid)
    return target


def read_displacement_field(path: str | os.PathLike, *, dtype: torch.dtype = torch.float32,
                            device=None):
    """Read a displacement field (a vector image of world-mm displacements, or an ITK file).

    Args:
        path: a vector image with D components on the fixed grid (.nii.gz, .nrrd, .mha, as
            itreg and ANTs write), or an ITK transform file holding a
            ``DisplacementFieldTransform``.
        dtype: dtype of the field (``float32`` or ``float64``).
        device: device of the field.

    Returns:
        :class:`~itreg.transforms.dense.DisplacementField` ``T(x) = x + d(x)``.

    Raises:
        TransformFileError: missing or unreadable file, a scalar image or a wrong number of
            components, NaN/Inf displacements, or a transform file of another type.
    """
    p = check_input_file(path, "displacement field", TransformFileError)
    where = f"displacement field {str(p)!r}"
    if is_transform_path(p):
        from itreg.transforms.dense import DisplacementField

        transform = read_transform(p, dtype=dtype, device=device)
        if not isinstance(transform, DisplacementField):
            raise TransformFileError(
                f"{where} holds a {type(transform).__name__}, not a displacement field; read it "
                "with itreg.io.read_transform"
            )
        return transform
    try:
        image = read_image(p, dtype=dtype)
    except (ImageReadError, ImageFormatError, InvalidImageError, GeometryError) as exc:
        raise TransformFileError(f"cannot read {where}: {exc}") from exc
    return _field_transform(image, where, device)
