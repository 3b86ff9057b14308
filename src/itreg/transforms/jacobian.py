"""Finite-difference Jacobians of transforms and displacement fields in world mm.

Derivatives are taken along the grid's index axes (central differences inside, second-order
one-sided differences at the faces, zero along axes of a single voxel) and converted to
derivatives with respect to world ``(x, y, z)`` with the grid's index-to-world matrix, so
oblique and anisotropic grids give world-frame Jacobians.
"""

from __future__ import annotations

import torch
from torch import Tensor

from itreg.errors import GeometryError
from itreg.grid import Grid
from itreg.transforms.base import Transform


def _index_derivative(field: Tensor, dim: int) -> Tensor:
    """Derivative along tensor axis `dim` in index units (same shape as `field`)."""
    n = field.shape[dim]
    if n == 1:
        return torch.zeros_like(field)
    return torch.gradient(field, dim=dim, edge_order=2 if n >= 3 else 1)[0]


def _check_spatial(field: Tensor, grid: Grid) -> None:
    d = grid.ndim
    if field.dim() < d or tuple(field.shape[-d:]) != grid.shape:
        raise GeometryError(
            f"field of shape {tuple(field.shape)} does not end with the grid shape {grid.shape}"
        )
    if not field.is_floating_point():
        raise GeometryError(f"field must be floating point, got {field.dtype}")


def _index_to_world_derivative(grid: Grid, like: Tensor) -> Tensor:
    """``di/dx`` (D x D, ITK order): row a = gradient of index a with respect to world."""
    d = grid.ndim
    m = torch.as_tensor(grid.world_to_index_matrix()[:d, :d])
    return m.to(dtype=like.dtype, device=like.device)


def spatial_gradient(field: Tensor, grid: Grid) -> Tensor:
    """World-mm gradient of a field sampled on `grid`.

    Args:
        field: ``(..., *grid.shape)`` values (any leading dimensions, e.g. components).
        grid: the sampling grid (spacing and direction matter).

    Returns:
        ``(..., D, *grid.shape)`` where index ``j`` of the new axis is ``d field / d x_j``
        (``x_0 = x``, ITK order), in field units per mm.
    """
    _check_spatial(field, grid)
    d = grid.ndim
    lead = field.dim() - d
    # Index-space derivatives, ITK axis a is tensor axis lead + d - 1 - a.
    g_index = torch.stack([_index_derivative(field, lead + d - 1 - a) for a in range(d)], dim=lead)
    didx = _index_to_world_derivative(grid, field)  # (a, j)
    # d f / d x_j = sum_a d f / d i_a * d i_a / d x_j
    return (g_index.movedim(lead, -1) @ didx).movedim(-1, lead)


def hessian(field: Tensor, grid: Grid) -> Tensor:
    """World-mm second derivatives of a field sampled on `grid`.

    Pure second derivatives use the compact 3-point stencil ``f[i+1] - 2 f[i] + f[i-1]`` (its
    edge value repeated at the faces; zero along axes with fewer than 3 voxels); mixed ones are
    central differences of central differences.

    Args:
        field: ``(..., *grid.shape)``.
        grid: the sampling grid.

    Returns:
        ``(..., D, D, *grid.shape)``: ``[j, k] = d^2 field / dx_j dx_k`` (symmetric).
    """
    _check_spatial(field, grid)
    d = grid.ndim
    lead = field.dim() - d
    first = [_index_derivative(field, lead + d - 1 - a) for a in range(d)]
    rows = []
    for a in range(d):
        dim_a = lead + d - 1 - a
        row = []
        for b in range(d):
            if a == b:
                n = field.shape[dim_a]
                if n < 3:
                    row.append(torch.zeros_like(field))
                    continue
                inner = (field.narrow(dim_a, 2, n - 2) - 2 * field.narrow(dim_a, 1, n - 2)
                         + field.narrow(dim_a, 0, n - 2))
                row.append(torch.cat([inner.narrow(dim_a, 0, 1), inner,
                                      inner.narrow(dim_a, n - 3, 1)], dim=dim_a))
            else:
                row.append(_index_derivative(first[b], dim_a))
        rows.append(torch.stack(row, dim=lead))
    h_index = torch.stack(rows, dim=lead)  # (..., a, b, *shape)
    didx = _index_to_world_derivative(grid, field)
    h = h_index.movedim(lead, -1).movedim(lead, -1)  # (..., *shape, a, b)
    h = didx.T @ h @ didx  # (..., *shape, j, k)
    return h.movedim(-1, lead).movedim(-1, lead)


def _displacement_channels_first(source: Transform | Tensor, grid: Grid) -> Tensor:
    if isinstance(source, Transform):
        if source.ndim != grid.ndim:
            raise GeometryError(f"transform is {source.ndim}D but grid is {grid.ndim}D")
        return torch.movedim(source.displacement(grid), -1, 0)
    field = torch.as_tensor(source)
    expected = (grid.ndim, *grid.shape)
    if tuple(field.shape) != expected:
        raise GeometryError(
            f"displacement of shape {tuple(field.shape)} does not match (D, *grid.shape) = "
            f"{expected}"
        )
    return field


def jacobian_matrix(source: Transform | Tensor, grid: Grid) -> Tensor:
    """Jacobian ``dT/dx`` of a transform (or of ``x + d`` for a displacement) on `grid`.

    Args:
        source: a :class:`Transform`, or a displacement tensor ``(D, *grid.shape)`` in world mm.
        grid: the grid the Jacobian is evaluated on.

    Returns:
        ``(*grid.shape, D, D)``: ``[..., i, j] = d T_i / d x_j`` (ITK order), dimensionless.
        Exact for affine maps; central finite differences otherwise.
    """
    disp = _displacement_channels_first(source, grid)  # (D, *shape)
    grad = spatial_gradient(disp, grid)  # (D_i, D_j, *shape)
    d = grid.ndim
    jac = grad.movedim(0, -1).movedim(0, -1)  # (*shape, i, j)
    eye = torch.eye(d, dtype=jac.dtype, device=jac.device)
    return jac + eye


def jacobian_determinant(source: Transform | Tensor, grid: Grid) -> Tensor:
    """``det(dT/dx)`` on `grid`, shape ``grid.shape`` (1 = volume preserved, <= 0 = folding).

    Args:
        source: a :class:`Transform`, or a displacement tensor ``(D, *grid.shape)`` in world mm.
        grid: the grid the determinant is evaluated on.
    """
    return torch.linalg.det(jacobian_matrix(source, grid))
