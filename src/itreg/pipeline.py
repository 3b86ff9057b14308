"""Transform chains as ANTs builds them, applied to images and point lists.

``antsApplyTransforms -t A -t B`` maps each reference point ``x`` to ``B(A(x))``: the first
``-t`` acts first on the point (ANTs' command-line parser hands its options over last first,
so the *last* ``-t`` is the first transform of its ITK ``CompositeTransform``, which applies
it last; moving an image, the last ``-t`` seems to act first). This is checked against
ANTs' own ``antsApplyTransforms`` and ``antsApplyTransformsToPoints``, and it is why
antsRegistration's ``-t out1Warp.nii.gz -t out0GenericAffine.mat`` sends a fixed point through
the warp (on the fixed grid) and then the affine. :func:`load_chain` builds exactly that map
from a list of specs, so ``apply_to_image(..., ["B", "A"])`` equals
``SimpleITK.CompositeTransform([A, B])`` (ITK's composite applies its last transform first).
A spec is
a file (ITK ``.tfm``/``.txt``/``.h5``/``.mat``, or a displacement-field image) or ANTs'
``[FILE,1]``, the inverse of the file's map (exact for linear maps; solved by fixed-point
iteration for fields and B-splines; ANTs itself accepts ``,1`` for linear maps only).

Images and points travel through the same chain in opposite senses: a chain that maps fixed
to moving points warps a *moving* image onto the *fixed* grid, and carries *fixed*-space
points into *moving* space. Moving-space points reach fixed space through the inverse
(``[transform.tfm,1]``, or a registration's ``inverse_displacement.nii.gz``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from itreg import io
from itreg.errors import ConfigError, GeometryError, TransformFileError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Compose, IterativeInverse, Transform, compose
from itreg.transforms.dense import DisplacementField
from itreg.warp import sample

logger = logging.getLogger(__name__)

#: Interpolation names of ``apply`` and the :mod:`itreg.warp` modes that do them: ``label``
#: votes between labels each interpolated by cubic B-splines (thin structures survive);
#: ``label-linear`` is ANTs' ``GenericLabel[Linear]`` (SimpleITK's ``sitkLabelLinear``).
INTERPOLATIONS = {"linear": "linear", "nearest": "nearest", "bspline": "bspline",
                  "label": "label-bspline", "label-linear": "label"}


@dataclass(frozen=True)
class TransformSpec:
    """One ``-t`` argument: a transform file and whether to use its inverse."""

    path: Path
    invert: bool = False

    def __str__(self) -> str:
        return f"[{self.path},1]" if self.invert else str(self.path)


def parse_transform_spec(text: str | os.PathLike | TransformSpec) -> TransformSpec:
    """``"A.mat"`` -> (A.mat, forward); ``"[A.mat,1]"`` -> (A.mat, inverse); ``"[A.mat,0]"``
    -> forward (ANTs' syntax).

    Raises:
        ConfigError: brackets without a 0/1 flag.
    """
    if isinstance(text, TransformSpec):
        return text
    s = str(text).strip()
    if not (s.startswith("[") and s.endswith("]")):
        return TransformSpec(Path(s))
    inner = s[1:-1]
    name, sep, flag = inner.rpartition(",")
    if not sep or flag.strip() not in ("0", "1") or not name.strip():
        raise ConfigError(f"transform {s!r}: expected FILE or [FILE,1] (ANTs' syntax: 1 uses "
                          "the inverse of the file's transform, 0 the transform itself)")
    return TransformSpec(Path(name.strip()), flag.strip() == "1")


def invert(transform: Transform, where: str = "transform") -> Transform:
    """The inverse of any itreg transform: exact for linear maps and velocity fields, iterative
    (:class:`~itreg.transforms.IterativeInverse`) for B-splines and displacement fields."""
    if transform.is_linear:
        lin = transform.linear_part() if isinstance(transform, Compose) else transform
        return lin.inverse()
    if not hasattr(transform, "inverse"):
        raise TransformFileError(f"{where}: a {type(transform).__name__} has no inverse in itreg")
    return transform.inverse()


def load_transform(spec, *, dtype: torch.dtype = torch.float64, device=None) -> Transform:
    """Read one spec (see :func:`parse_transform_spec`) as an itreg transform."""
    spec = parse_transform_spec(spec)
    t = io.read_transform(spec.path, dtype=dtype, device=device)
    return invert(t, f"transform {str(spec.path)!r}") if spec.invert else t


def load_chain(specs: Sequence, *, dtype: torch.dtype = torch.float64, device=None) -> Transform:
    """The map ``x -> tn(...t2(t1(x)))`` of specs ``[t1, ..., tn]`` (antsApplyTransforms'
    order: the first spec acts first on a point), i.e. ``Compose(tn, ..., t1)``.

    Raises:
        ConfigError: no specs.
        TransformFileError: an unreadable file.
        GeometryError: the transforms differ in dimension.
    """
    parsed = [parse_transform_spec(s) for s in specs]
    if not parsed:
        raise ConfigError("give at least one transform (-t FILE)")
    parts = [load_transform(s, dtype=dtype, device=device) for s in parsed]
    dims = {t.ndim for t in parts}
    if len(dims) > 1:
        which = ", ".join(f"{s} ({t.ndim}D)" for s, t in zip(parsed, parts))
        raise GeometryError(f"the transforms differ in dimension: {which}; chain transforms of "
                            "one dimension")
    return compose(*reversed(parts))


# ---------------------------------------------------------------------------------- images
def _resample_one(image: Image, chain: Transform, grid: Grid, mode: str,
                  default_value: float) -> Image:
    if image.ndim != chain.ndim:
        raise GeometryError(f"the image is {image.ndim}D but the transforms are {chain.ndim}D")
    labels = mode in ("label", "label-linear")
    if labels and image.data.is_floating_point():
        rounded = image.data.round()
        if not torch.equal(rounded, image.data):
            logger.warning("label interpolation of a non-integer image: values are rounded")
        image = image.with_data(rounded.to(torch.int64), is_label=True)
    # Geometry in float64 for every mode (label weights and nearest rounding included), so the
    # result agrees with SimpleITK's double-precision resampler voxel for voxel.
    work = image.float(torch.float64) if mode in ("linear", "bspline") else image
    with torch.no_grad():
        points = chain.to(work.device).on_grid(grid, dtype=torch.float64, device=work.device)
        values, _ = sample(work, points, mode=INTERPOLATIONS[mode], padding=default_value)
    if mode in ("linear", "bspline"):
        return Image(values.to(torch.float32), grid, is_label=False)
    return Image(values, grid, is_label=bool(image.is_label) or labels)


def apply_to_image(
    image_path: str | os.PathLike,
    reference_path: str | os.PathLike,
    transforms: Sequence,
    out_path: str | os.PathLike,
    *,
    interpolation: str = "linear",
    default_value: float = 0.0,
    force: bool = False,
    device=None,
) -> Path:
    """Resample an image onto the reference grid through a chain (``antsApplyTransforms``).

    Each reference point ``x`` takes the image's value at ``tn(...t2(t1(x)))`` for
    ``transforms = [t1, ..., tn]``, as ``antsApplyTransforms -t t1 ... -t tn`` does. A 4D image is resampled volume by volume and written as 4D.

    Args:
        image_path: the image to warp (2D, 3D, vector or 4D series).
        reference_path: the image whose grid the output takes.
        transforms: specs (files or ``[FILE,1]``), in antsApplyTransforms' order.
        out_path: the output image (atomic; refused if it exists unless `force`).
        interpolation: ``linear``, ``nearest``, ``bspline`` (cubic, as ``sitkBSpline``),
            ``label`` (each label's one-hot image interpolated by cubic B-splines and the
            largest wins, so one-voxel lines and sheets survive) or ``label-linear`` (the same
            vote with linear weights: ANTs' ``GenericLabel``, SimpleITK's ``sitkLabelLinear``).
            ``linear``/``bspline`` write float32, the others keep the pixel type.
        default_value: value of points that map outside the image.
        force: replace an existing output.
        device: torch device of the computation (default CPU).

    Returns:
        The output path.
    """
    if interpolation not in INTERPOLATIONS:
        raise ConfigError(f"unknown interpolation {interpolation!r}; valid: "
                          f"{', '.join(INTERPOLATIONS)}")
    from itreg.io import atomic_output_file
    from itreg.io.series import image_dimension, read_series, write_series

    out_path = Path(out_path)
    protect = [image_path, reference_path]
    with atomic_output_file(out_path, force=force, protect=protect) as tmp:
        reference_grid = io.read_header(reference_path).grid
        chain = load_chain(transforms, device=device)
        # Integer images are intensities for linear/bspline; nearest and label keep the type.
        is_label = False if interpolation in ("linear", "bspline") else None
        dim, _size = image_dimension(image_path)
        if dim == 4:
            volumes, axis = read_series(image_path, is_label=is_label)
            out = [_resample_one(v.to(device) if device else v, chain, reference_grid,
                                 interpolation, default_value).to("cpu") for v in volumes]
            write_series(out, axis, tmp)
        else:
            image = io.read_image(image_path, is_label=is_label)
            if device is not None:
                image = image.to(device)
            out = _resample_one(image, chain, reference_grid, interpolation, default_value)
            io.write_image(out.to("cpu"), tmp)
    return out_path


# ---------------------------------------------------------------------------------- points
def apply_to_points(
    points_path: str | os.PathLike,
    transforms: Sequence,
    out_path: str | os.PathLike,
    *,
    coordinates: str = "lps",
    force: bool = False,
) -> Path:
    """Map a point file through a chain: each point ``p`` becomes ``tn(...t2(t1(p)))``.

    This is ``antsApplyTransformsToPoints``: the chain that warps a moving image onto the fixed
    grid (fixed -> moving) carries fixed-space points into moving space; moving-space points go
    to fixed space through the inverse chain (``[FILE,1]`` for linear files, or an inverse
    displacement field).

    Args:
        points_path: ``.csv``, ``.fcsv`` or ``.mrk.json`` (see :mod:`itreg.io.points`).
        transforms: specs, in antsApplyTransformsToPoints' order (the first acts first).
        out_path: output file of the same format; all other columns and fields are kept and
            the coordinates stay in the input's system.
        coordinates: ``"lps"`` or ``"ras"``: the system of a CSV's coordinates.
        force: replace an existing output.

    Returns:
        The output path.
    """
    from itreg.io import atomic_output_file
    from itreg.io.points import point_format, read_point_table, render_point_table

    out_path = Path(out_path)
    if point_format(out_path) != point_format(points_path):
        raise ConfigError(f"output {str(out_path)!r} is not a {point_format(points_path)} file "
                          f"like the input {str(points_path)!r}; give it the input's extension")
    with atomic_output_file(out_path, force=force, protect=[points_path]) as tmp:
        table = read_point_table(points_path, coordinates=coordinates)
        chain = load_chain(transforms)
        if table.points.shape[1] != chain.ndim:
            raise GeometryError(f"point file {str(points_path)!r} holds "
                                f"{table.points.shape[1]}D points but the transforms are "
                                f"{chain.ndim}D")
        with torch.no_grad():
            mapped = chain(torch.as_tensor(table.points, dtype=torch.float64)).numpy()
        tmp.write_text(render_point_table(table, mapped), encoding="utf-8")
    return out_path


# ---------------------------------------------------------------------------------- inverses
def inverse_field(transform: Transform, grid: Grid, *, fixed_grid: Grid | None = None,
                  tolerance_mm: float = 1e-4, max_iterations: int = 200) -> DisplacementField:
    """The inverse of `transform` (fixed -> moving) sampled on `grid` (normally the moving
    grid) as a displacement field, moving -> fixed.

    Linear parts are inverted exactly; deformations by fixed-point iteration on the exact
    forward map to `tolerance_mm`, started from ``exp(-v)`` for velocity fields and, when
    `fixed_grid` is given, from the inverse of the deformation sampled on it (a fast first
    pass) for B-splines.
    """
    inv = _inverse_with(transform, tolerance_mm, max_iterations, fixed_grid)
    with torch.no_grad():
        disp = inv.displacement(grid, dtype=torch.float64)
    return DisplacementField(torch.movedim(disp, -1, 0), grid, learnable=False)


def _inverse_with(t: Transform, tol: float, iters: int, proxy_grid: Grid | None = None
                  ) -> Transform:
    from itreg.transforms.dense import StationaryVelocityField

    if t.is_linear:
        return invert(t)
    if isinstance(t, Compose):
        return Compose(*[_inverse_with(s, tol, iters, proxy_grid) for s in reversed(t.transforms)])
    if isinstance(t, IterativeInverse):
        return t.transform
    if isinstance(t, StationaryVelocityField):
        return IterativeInverse(t.to_displacement_field(), iters, tol, initial=t.inverse())
    initial = None
    if proxy_grid is not None and not isinstance(t, DisplacementField):
        proxy = DisplacementField.from_transform(t, proxy_grid, learnable=False,
                                                 dtype=torch.float64)
        initial = IterativeInverse(proxy, iters, tol)
    return IterativeInverse(t, iters, tol, initial=initial)


def inverse_consistency(transform: Transform, inverse: Transform, grid: Grid,
                        region: torch.Tensor | None = None) -> dict:
    """``|inverse(transform(x)) - x|`` over the points of `grid` in `region` (mm).

    Args:
        transform: fixed -> moving.
        inverse: moving -> fixed (for example the written inverse field).
        grid: the fixed grid.
        region: bool ``grid.shape`` mask of the points to measure (None: all).

    Returns:
        ``{"mean_mm", "p95_mm", "max_mm", "points"}``.
    """
    with torch.no_grad():
        mapped = transform.on_grid(grid, dtype=torch.float64)
        back = inverse(mapped.reshape(-1, grid.ndim)).reshape(mapped.shape)
        err = (back - grid.points(dtype=torch.float64, device=back.device)).norm(dim=-1)
    if region is not None:
        err = err[region.to(err.device).bool()]
    err = err.cpu().numpy()
    if err.size == 0:
        return {"mean_mm": None, "p95_mm": None, "max_mm": None, "points": 0}
    return {"mean_mm": float(err.mean()), "p95_mm": float(np.percentile(err, 95)),
            "max_mm": float(err.max()), "points": int(err.size)}


def overlap_region(transform: Transform, fixed_grid: Grid, moving_grid: Grid) -> torch.Tensor:
    """Bool ``fixed_grid.shape``: the fixed points that `transform` maps inside the moving
    grid's voxel extent."""
    with torch.no_grad():
        mapped = transform.on_grid(fixed_grid, dtype=torch.float64)
        index = moving_grid.world_to_index(mapped.cpu())
    upper = torch.tensor([n - 0.5 for n in moving_grid.size], dtype=index.dtype)
    return ((index >= -0.5) & (index < upper)).all(dim=-1)


def write_transform_outputs(transform: Transform, fixed_grid: Grid, moving_grid: Grid,
                            folder: str | os.PathLike, region: torch.Tensor | None = None,
                            region_name: str = "fixed mask", *, inverse: bool = True,
                            h5: bool = True, compress: bool | str = True, submit=None,
                            image_suffix: str = ".nii.gz") -> tuple[list[str], dict | None]:
    """Write ``transform.h5`` and the inverse of a fixed -> moving transform into `folder`.

    ``transform.h5`` holds the whole map as one exact ITK file (a ``CompositeTransform`` of
    affine and B-spline or displacement field for deformable maps). Linear maps get
    ``inverse.tfm`` (exact, float64); deformable ones ``inverse_displacement.nii.gz``, the
    moving -> fixed map as a displacement field on `moving_grid` (see :func:`inverse_field`),
    and the residual ``|inverse(T(x)) - x|`` of the written (float32) field over `region`
    (default: the fixed points that T maps inside the moving image).

    Args:
        inverse: write the inverse (False: ``transform.h5`` only, no inverse work).
        h5: write ``transform.h5``.
        compress: compression of the inverse field (see :func:`itreg.io.write_image`).
        submit: ``submit(fn, *args, **kwargs)`` that runs a file write, for example a thread
            pool's (the caller then waits for it); default: run it here.
        image_suffix: extension of the inverse field (``.nii.gz`` or ``.nii``).

    Returns:
        The file names written and the inverse-consistency record (None for linear maps or
        without `inverse`).
    """
    import copy

    from itreg.transforms import exportable

    def run_now(fn, *args, **kwargs):
        return fn(*args, **kwargs)

    submit = submit or run_now
    folder = Path(folder)
    written: list[str] = []
    if h5:
        io.write_transform(exportable(transform), folder / "transform.h5")
        written.append("transform.h5")
    if not inverse:
        return written, None
    if transform.is_linear:
        lin = transform.linear_part() if isinstance(transform, Compose) else transform
        io.write_transform(copy.deepcopy(lin).double().inverse(), folder / "inverse.tfm")
        return [*written, "inverse.tfm"], None
    field = inverse_field(transform, moving_grid, fixed_grid=fixed_grid)
    name = "inverse_displacement" + image_suffix
    submit(io.write_displacement_field, field, moving_grid, folder / name, compress=compress)
    # The residual of the field as written: its float32 voxels, read back exactly.
    stored = DisplacementField(field.field.detach().to(torch.float32).to(torch.float64),
                               moving_grid, learnable=False)
    if region is None:
        region, region_name = overlap_region(transform, fixed_grid, moving_grid), "overlap"
    record = {**inverse_consistency(transform, stored, fixed_grid, region),
              "region": region_name}
    return [*written, name], record
