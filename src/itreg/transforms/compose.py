"""Composition of transforms in ITK ``CompositeTransform`` order."""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.transforms.base import Identity, Transform
from itreg.transforms.linear import Affine

logger = logging.getLogger(__name__)


class Compose(Transform):
    """``Compose(a, b, c)(x) == a(b(c(x)))``: the last transform is applied first.

    This is ITK's ``CompositeTransform`` order (transforms added first are applied last), so
    staged registration builds ``Compose(affine, bspline)``: the B-spline deforms fixed points,
    then the affine maps them into the moving image.

    Args:
        *transforms: one or more transforms of the same dimension.

    Raises:
        ConfigError: no transforms, or an argument is not a :class:`Transform`.
        GeometryError: the transforms have different dimensions.
    """

    def __init__(self, *transforms: Transform) -> None:
        if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
            transforms = tuple(transforms[0])
        if not transforms:
            raise ConfigError("Compose needs at least one transform")
        for t in transforms:
            if not isinstance(t, Transform):
                raise ConfigError(f"Compose takes itreg transforms, got {type(t).__name__}")
        dims = {t.ndim for t in transforms}
        if len(dims) != 1:
            raise GeometryError(f"cannot compose transforms of different dimensions {sorted(dims)}")
        super().__init__(dims.pop())
        self._transforms = nn.ModuleList(transforms)

    @property
    def transforms(self) -> nn.ModuleList:
        """The composed transforms, outermost first (the last is applied to points first)."""
        return self._transforms

    @property
    def is_linear(self) -> bool:  # type: ignore[override]
        return all(t.is_linear for t in self._transforms)

    def __len__(self) -> int:
        return len(self._transforms)

    def __getitem__(self, i: int) -> Transform:
        return self._transforms[i]

    def forward(self, points: Tensor) -> Tensor:
        """Map world points ``(..., D)`` through every transform, last one first."""
        self._check_points(points)
        for t in reversed(self._transforms):
            points = t(points)
        return points

    def on_grid(self, grid: Grid, dtype: torch.dtype | None = None, device=None) -> Tensor:
        """``T(x)`` on `grid`, ``(*grid.shape, D)``: the innermost transform's fast grid path,
        then the others applied to its output points."""
        inner = self._transforms[-1]
        points = inner.on_grid(grid, dtype=dtype, device=device)
        for t in reversed(self._transforms[:-1]):
            points = t(points)
        return points

    def parameter_scales(self, radius: float) -> list[Tensor]:
        """Each transform's scales, in the order of ``self.parameters()``."""
        scales: list[Tensor] = []
        seen: set[int] = set()
        for t in self._transforms:
            params = list(t.parameters())
            for p, s in zip(params, t.parameter_scales(radius)):
                if id(p) not in seen:
                    seen.add(id(p))
                    scales.append(s)
        return scales

    def linear_part(self) -> Affine | None:
        """The composition as one :class:`Affine` if every transform is linear, else None.

        The result's centre is that of the innermost (fixed-space) transform when it has one.
        """
        if not self.is_linear:
            return None
        ref = self._reference_tensor()
        dtype = ref.dtype if ref is not None else torch.float32
        device = ref.device if ref is not None else None
        with torch.no_grad():
            d = self.ndim
            matrix = torch.eye(d, dtype=torch.float64, device=device)
            offset = torch.zeros(d, dtype=torch.float64, device=device)
            center = None
            for t in self._transforms:  # outermost first: T = t1 o t2 o ... o tn
                a, b = _linear_map(t, d, device)
                offset = offset + matrix @ b
                matrix = matrix @ a
                if hasattr(t, "center"):
                    center = t.center.detach().to(torch.float64)
            c = center.cpu() if center is not None else None
            return Affine.from_matrix(matrix.cpu(), offset.cpu(), center=c, dtype=dtype,
                                      device=device)

    def inverse(self) -> Compose:
        """``Compose(tn^-1, ..., t1^-1)`` for transforms that all have ``inverse()``."""
        missing = [type(t).__name__ for t in self._transforms
                   if not hasattr(t, "inverse") and not isinstance(t, Identity)]
        if missing:
            raise ConfigError(f"cannot invert Compose: no inverse() for {', '.join(missing)}")
        return Compose(*[t if isinstance(t, Identity) else t.inverse()
                         for t in reversed(self._transforms)])


def _linear_map(t: Transform, d: int, device) -> tuple[Tensor, Tensor]:
    """``(A, b)`` with ``t(x) = A x + b`` in float64, for a linear transform."""
    if hasattr(t, "matrix") and hasattr(t, "offset"):
        return (t.matrix().detach().to(torch.float64).to(device),
                t.offset().detach().to(torch.float64).to(device))
    if isinstance(t, Compose):
        lin = t.linear_part()
        return lin.matrix().detach().to(torch.float64).to(device), lin.offset().detach().to(
            torch.float64).to(device)
    # Any other linear map (e.g. Identity): read it off from D + 1 points.
    pts = torch.cat([torch.zeros(1, d), torch.eye(d)]).to(dtype=torch.float64, device=device)
    ref = t._reference_tensor()
    out = t(pts.to(ref.dtype) if ref is not None else pts).to(torch.float64)
    b = out[0]
    return (out[1:] - b).T, b


def compose(*transforms: Transform) -> Transform:
    """The map ``x -> t1(t2(...tn(x)))`` in ITK ``CompositeTransform`` order, simplified.

    Nested :class:`Compose` objects are flattened, identities dropped and runs of adjacent
    linear transforms merged into one :class:`~itreg.transforms.Affine` (exact, float64). The
    result is a single transform when one is left (an :class:`Identity` when none is), else a
    :class:`Compose`. ``compose(b, a)`` is what ``antsApplyTransforms -t b -t a`` applies and
    what ``SimpleITK.CompositeTransform([b, a])`` computes.

    Raises:
        ConfigError: no transforms, or an argument is not a :class:`Transform`.
        GeometryError: the transforms have different dimensions.
    """
    if len(transforms) == 1 and isinstance(transforms[0], (list, tuple)):
        transforms = tuple(transforms[0])
    full = Compose(*transforms)  # validates types and dimensions
    flat: list[Transform] = []

    def walk(t: Transform) -> None:
        if isinstance(t, Compose):
            for sub in t.transforms:
                walk(sub)
        elif not isinstance(t, Identity):
            flat.append(t)

    walk(full)
    merged: list[Transform] = []
    for t in flat:
        if t.is_linear and merged and merged[-1].is_linear:
            merged[-1] = Compose(merged[-1], t).linear_part()
        else:
            merged.append(t)
    if not merged:
        return Identity(full.ndim)
    return merged[0] if len(merged) == 1 else Compose(*merged)


def exportable(transform: Transform) -> Transform:
    """The same map built only from types that ITK transform files hold.

    A :class:`~itreg.transforms.StationaryVelocityField` becomes the
    :class:`~itreg.transforms.DisplacementField` of ``exp(v)`` on its grid (the map it applies,
    exactly); compositions are rebuilt part by part; other transforms are returned unchanged
    (``itreg.io.write_transform`` says which it cannot write).
    """
    from itreg.transforms.dense import StationaryVelocityField

    if isinstance(transform, StationaryVelocityField):
        return transform.to_displacement_field(learnable=False)
    if isinstance(transform, Compose):
        return Compose(*[exportable(t) for t in transform.transforms])
    return transform
