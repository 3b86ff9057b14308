"""Initial transforms (registry :data:`INITIALISERS`).

- ``"centers"``: translate the fixed grid's geometric centre onto the moving grid's (ITK's
  ``CenteredTransformInitializer`` in GEOMETRY mode); the centre of rotation is the fixed
  grid's centre.
- ``"moments"``: translate the fixed image's intensity centre of mass onto the moving image's
  (intensities shifted to be non-negative, inside the masks; ITK's MOMENTS mode); the centre of
  rotation is the fixed centre of mass.
- ``"none"``: the identity, centre of rotation at the fixed grid's centre.
- a :class:`~itreg.transforms.Transform` (for example read from a file): linear transforms
  (and compositions of them) start the linear stages; when the first stage is a ``bspline``
  stage, a B-spline FFD on its control grid (the same control spacing on the same fixed grid,
  e.g. from :meth:`~itreg.transforms.BSpline.fit`) is its starting point; any other
  transform is kept, frozen, as the outermost factor of the result.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.image import Image
from itreg.transforms import LinearTransform, Transform, Translation


def center_of_mass(image: Image, mask: Tensor | None = None) -> Tensor | None:
    """World position (float64, ITK order) of the intensity centre of mass, or None if the
    image has no mass inside the mask.

    Intensities are shifted so that the minimum inside the mask is zero. Computed from the
    marginal sums along each axis, so no per-voxel coordinates are built.
    """
    data = image.data[0].to(torch.float64)
    if mask is not None:
        m = mask.to(torch.bool)
        if not bool(m.any()):
            return None
        w = torch.where(m, data - data[m].min(), torch.zeros_like(data))
    else:
        w = data - data.min()
    total = float(w.sum())
    if not total > 0:
        return None
    nd = data.dim()
    index = []
    for a in range(nd):  # tensor axis a is ITK axis nd - 1 - a
        marginal = w.sum(dim=tuple(b for b in range(nd) if b != a))
        pos = torch.arange(marginal.numel(), dtype=torch.float64, device=marginal.device)
        index.append(float((marginal * pos).sum()) / total)
    idx = torch.tensor(index[::-1], dtype=torch.float64)
    return image.grid.index_to_world(idx)


def _translation(ndim: int, center, offset, dtype, device) -> Translation:
    return Translation(ndim, center=torch.as_tensor(center, dtype=torch.float64),
                       translation=torch.as_tensor(offset, dtype=torch.float64),
                       dtype=dtype, device=device)


def init_centers(fixed: Image, moving: Image, fixed_mask, moving_mask, dtype, device
                 ) -> Translation:
    """Geometric centres (see the module docstring)."""
    cf = torch.tensor(fixed.grid.center, dtype=torch.float64)
    cm = torch.tensor(moving.grid.center, dtype=torch.float64)
    return _translation(fixed.ndim, cf, cm - cf, dtype, device)


def init_moments(fixed: Image, moving: Image, fixed_mask, moving_mask, dtype, device
                 ) -> Translation:
    """Intensity centres of mass (see the module docstring); geometric centres as fallback."""
    cf = center_of_mass(fixed, fixed_mask)
    mm = None if moving_mask is None else moving_mask.data[0] > 0.5
    cm = center_of_mass(moving, mm)
    if cf is None or cm is None:
        return init_centers(fixed, moving, fixed_mask, moving_mask, dtype, device)
    return _translation(fixed.ndim, cf, cm - cf, dtype, device)


def init_none(fixed: Image, moving: Image, fixed_mask, moving_mask, dtype, device
              ) -> Translation:
    """The identity with the centre of rotation at the fixed grid's centre."""
    cf = torch.tensor(fixed.grid.center, dtype=torch.float64)
    return _translation(fixed.ndim, cf, torch.zeros_like(cf), dtype, device)


#: Named initialisations.
INITIALISERS: dict[str, Callable[..., Translation]] = {
    "centers": init_centers,
    "moments": init_moments,
    "none": init_none,
}


def initial_transforms(init: str | Transform, fixed: Image, moving: Image,
                       fixed_mask: Tensor | None, moving_mask: Image | None,
                       dtype: torch.dtype, device) -> tuple[LinearTransform, Transform | None]:
    """The starting linear transform and an optional frozen outer (non-linear) transform.

    Args:
        init: a name of :data:`INITIALISERS` or a transform (fixed -> moving points).
        fixed: fixed image.
        moving: moving image.
        fixed_mask: bool mask on the fixed grid or None.
        moving_mask: float mask image on the moving grid or None.
        dtype: working dtype.
        device: working device.

    Raises:
        ConfigError: unknown initialisation name.
        GeometryError: a transform of another dimension.
    """
    if isinstance(init, str):
        if init not in INITIALISERS:
            raise ConfigError(
                f"unknown initialisation {init!r}; valid initialisations are: "
                f"{', '.join(INITIALISERS)}, or a transform (for example read from a file)")
        return INITIALISERS[init](fixed, moving, fixed_mask, moving_mask, dtype, device), None
    if not isinstance(init, Transform):
        raise ConfigError(f"init must be one of {', '.join(INITIALISERS)} or an itreg "
                          f"Transform, got {type(init).__name__}")
    if init.ndim != fixed.ndim:
        raise GeometryError(f"the initial transform is {init.ndim}D but the images are "
                            f"{fixed.ndim}D")
    given = copy.deepcopy(init).to(device=device)
    if isinstance(given, LinearTransform):
        linear = given.to(dtype=dtype)
    elif given.is_linear and hasattr(given, "linear_part"):
        linear = given.linear_part().to(dtype=dtype, device=device)
    else:
        given.requires_grad_(False)
        return init_none(fixed, moving, fixed_mask, moving_mask, dtype, device), given
    linear.requires_grad_(True)
    return linear, None
