"""Linear transforms with ITK's parameterisation.

All follow ``T(x) = A (x - c) + c + t`` with a fixed centre of rotation ``c`` (a buffer, ITK's
"fixed parameters") and optimisable ``t`` and ``A``'s parameters. ``matrix()`` returns ``A``,
``offset()`` returns ``t + c - A c`` so that ``T(x) = A x + offset`` (ITK's ``GetOffset``).

* :class:`Translation`: ``A = I``.
* :class:`Rigid`: ``A = R``; 2D one angle, 3D Euler angles ``(ax, ay, az)`` in radians composed
  as ITK's ``Euler3DTransform`` does by default, ``R = Rz @ Rx @ Ry``.
* :class:`Similarity`: ``A = s R`` with isotropic scale ``s``.
* :class:`Affine`: ``A`` free (D x D), initialised to the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from itreg.errors import GeometryError
from itreg.transforms.base import Transform


def _vector(values, ndim: int, name: str, dtype, device) -> Tensor:
    if values is None:
        return torch.zeros(ndim, dtype=dtype, device=device)
    t = torch.as_tensor(np.asarray(values, dtype=np.float64), dtype=dtype, device=device).reshape(-1)
    if t.numel() != ndim:
        raise GeometryError(f"{name} needs {ndim} values, got {t.numel()}")
    return t.clone()


def rotation_matrix(angles: Tensor, ndim: int) -> Tensor:
    """Rotation matrix from ITK Euler angles (1 angle in 2D; ``(ax, ay, az)`` in 3D)."""
    if ndim == 2:
        c, s = torch.cos(angles[0]), torch.sin(angles[0])
        return torch.stack([torch.stack([c, -s]), torch.stack([s, c])])
    cx, cy, cz = torch.cos(angles)
    sx, sy, sz = torch.sin(angles)
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    rx = torch.stack([torch.stack([one, zero, zero]), torch.stack([zero, cx, -sx]),
                      torch.stack([zero, sx, cx])])
    ry = torch.stack([torch.stack([cy, zero, sy]), torch.stack([zero, one, zero]),
                      torch.stack([-sy, zero, cy])])
    rz = torch.stack([torch.stack([cz, -sz, zero]), torch.stack([sz, cz, zero]),
                      torch.stack([zero, zero, one])])
    return rz @ rx @ ry


class LinearTransform(Transform):
    """Base of the linear family: ``T(x) = A (x - c) + c + t``."""

    is_linear = True

    def __init__(
        self,
        ndim: int,
        center: Sequence[float] | Tensor | None = None,
        translation: Sequence[float] | Tensor | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ) -> None:
        super().__init__(ndim)
        self.register_buffer("center", _vector(center, ndim, "center", dtype, device))
        self.translation = nn.Parameter(_vector(translation, ndim, "translation", dtype, device))

    def matrix(self) -> Tensor:
        """The D x D linear part ``A``."""
        return torch.eye(self.ndim, dtype=self.translation.dtype, device=self.translation.device)

    def offset(self) -> Tensor:
        """``t + c - A c``, so that ``T(x) = A x + offset``."""
        a = self.matrix()
        return self.translation + self.center - a @ self.center

    def homogeneous(self) -> Tensor:
        """The (D+1) x (D+1) homogeneous matrix of ``x -> A x + offset``."""
        d = self.ndim
        m = torch.eye(d + 1, dtype=self.translation.dtype, device=self.translation.device)
        m = m.clone()
        m[:d, :d] = self.matrix()
        m[:d, d] = self.offset()
        return m

    def forward(self, points: Tensor) -> Tensor:
        self._check_points(points)
        a = self.matrix().to(points.dtype)
        b = self.offset().to(points.dtype)
        return points @ a.T + b

    def set_center(self, center: Sequence[float] | Tensor) -> None:
        """Move the centre of rotation keeping the map unchanged (adjusts the translation)."""
        with torch.no_grad():
            new_c = _vector(center, self.ndim, "center", self.center.dtype, self.center.device)
            a = self.matrix()
            # A(x - c) + c + t == A(x - c') + c' + t'  =>  t' = t + (c - c') - A (c - c')
            delta = self.center - new_c
            self.translation.add_(delta - a @ delta)
            self.center.copy_(new_c)

    def to_affine(self) -> Affine:
        """The same map as an :class:`Affine` (same centre), for staged registration."""
        with torch.no_grad():
            return Affine(
                self.ndim,
                center=self.center.detach().clone(),
                translation=self.translation.detach().clone(),
                matrix=self.matrix().detach().clone(),
                dtype=self.translation.dtype,
                device=self.translation.device,
            )

    def inverse(self) -> Affine:
        """The inverse map as an :class:`Affine` with the same centre."""
        with torch.no_grad():
            a_inv = torch.linalg.inv(self.matrix())
            # x = A^-1 (y - offset): offset_inv = -A^-1 offset; choose t for centre c.
            off_inv = -a_inv @ self.offset()
            c = self.center
            t = off_inv - c + a_inv @ c
            return Affine(self.ndim, center=c.clone(), translation=t, matrix=a_inv,
                          dtype=c.dtype, device=c.device)

    def parameter_scales(self, radius: float) -> list[Tensor]:
        scales = []
        for name, p in self.named_parameters():
            scales.append(torch.ones_like(p) if name == "translation" else
                          torch.full_like(p, 1.0 / max(radius, 1e-6)))
        return scales

    def extra_repr(self) -> str:
        return f"ndim={self.ndim}"


class Translation(LinearTransform):
    """``T(x) = x + t``."""


class Rigid(LinearTransform):
    """Rotation about ``center`` plus translation (ITK Euler2D/Euler3D parameterisation)."""

    def __init__(self, ndim: int, center=None, translation=None, angles=None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(ndim, center, translation, dtype, device)
        n_angles = 1 if ndim == 2 else 3
        self.angles = nn.Parameter(_vector(angles, n_angles, "angles", dtype, device))

    def rotation(self) -> Tensor:
        return rotation_matrix(self.angles, self.ndim)

    def matrix(self) -> Tensor:
        return self.rotation()


class Similarity(Rigid):
    """Isotropic scaling times rotation about ``center``, plus translation: ``A = s R``."""

    def __init__(self, ndim: int, center=None, translation=None, angles=None, scale: float = 1.0,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(ndim, center, translation, angles, dtype, device)
        self.scale = nn.Parameter(torch.tensor([float(scale)], dtype=dtype, device=device))

    def matrix(self) -> Tensor:
        return self.scale[0] * self.rotation()


class Affine(LinearTransform):
    """General affine map: ``A`` is a free D x D matrix."""

    def __init__(self, ndim: int, center=None, translation=None, matrix=None,
                 dtype: torch.dtype = torch.float32, device=None) -> None:
        super().__init__(ndim, center, translation, dtype, device)
        if matrix is None:
            a = torch.eye(ndim, dtype=dtype, device=device)
        else:
            a = torch.as_tensor(np.asarray(torch.as_tensor(matrix).detach().cpu(), np.float64),
                                dtype=dtype, device=device).reshape(ndim, ndim).clone()
        self.linear = nn.Parameter(a)

    def matrix(self) -> Tensor:
        return self.linear

    @classmethod
    def from_matrix(cls, matrix, offset, center=None, dtype=torch.float32, device=None) -> Affine:
        """Build from ``T(x) = matrix @ x + offset`` with the given centre (default 0)."""
        a = torch.as_tensor(np.asarray(matrix, np.float64), dtype=torch.float64)
        d = a.shape[0]
        c = torch.zeros(d, dtype=torch.float64) if center is None else torch.as_tensor(
            np.asarray(center, np.float64))
        off = torch.as_tensor(np.asarray(offset, np.float64))
        t = off - c + a @ c
        return cls(d, center=c, translation=t, matrix=a, dtype=dtype, device=device)
