"""The 1D cubic B-spline pieces of :mod:`itreg.transforms.bspline`: the basis weights and
derivatives, exact Gram matrices of the basis (bending energy), subdivision, and per-axis
(separable) contraction of coefficient tensors. Pure tensor / array functions, no transform.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def cubic_bspline_weights(t: Tensor) -> Tensor:
    """Weights of the 4 control points supporting fractional position ``t`` in ``[0, 1)``.

    Args:
        t: fractional part of the continuous control index, any shape.

    Returns:
        Tensor ``(*t.shape, 4)``: ``B3(t + 1), B3(t), B3(1 - t), B3(2 - t)``, the weights of
        control points ``floor(u) - 1 ... floor(u) + 2``. They sum to 1.
    """
    t2 = t * t
    t3 = t2 * t
    w0 = (1.0 - t) ** 3 / 6.0
    w1 = (3.0 * t3 - 6.0 * t2 + 4.0) / 6.0
    w2 = (-3.0 * t3 + 3.0 * t2 + 3.0 * t + 1.0) / 6.0
    w3 = t3 / 6.0
    return torch.stack([w0, w1, w2, w3], dim=-1)


def _contract(coefficients: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """Apply one matrix per spatial axis to a coefficient tensor.

    Args:
        coefficients: ``(C, *M)`` with spatial axes in tensor order ``(Z, Y, X)``.
        matrices: one ``(n_a, m_a)`` matrix per ITK axis ``a`` (x first).

    Returns:
        ``(C, *N)``: ``out[c, ..n..] = sum_m prod_a W_a[n_a, m_a] coefficients[c, ..m..]``.
    """
    d = len(matrices)
    out = coefficients
    # Contract the axes that grow the tensor least first (cheapest order).
    order = sorted(range(d), key=lambda a: matrices[a].shape[0] / max(matrices[a].shape[1], 1))
    for a in order:
        axis = 1 + (d - 1 - a)  # tensor axis of ITK axis a
        out = torch.movedim(torch.tensordot(out, matrices[a], dims=([axis], [1])), -1, axis)
    return out


def _contract_channels_last(values: Tensor, matrices: Sequence[Tensor]) -> Tensor:
    """:func:`_contract` for ``values (*M, C)`` (channels last): contiguous ``(*N, C)``.

    The first tensor axis (z in 3D) is contracted last, as one matrix product whose result is
    already in place (no copy of the full-resolution output).
    """
    d = len(matrices)
    out = values
    for t in range(d - 1, -1, -1):  # tensor axis t is ITK axis d - 1 - t
        out = torch.movedim(torch.tensordot(matrices[d - 1 - t], out, dims=([1], [t])), 0, t)
    return out.contiguous()


#: Gauss-Legendre nodes and weights on [0, 1]; 4 nodes integrate the degree-6 products of
#: cubic B-spline pieces exactly.
_LEGENDRE = np.polynomial.legendre.leggauss(4)
_GAUSS_NODES, _GAUSS_WEIGHTS = (_LEGENDRE[0] + 1) / 2, _LEGENDRE[1] / 2


def cubic_bspline_derivative(t: np.ndarray, order: int) -> np.ndarray:
    """The centred cubic B-spline ``B3`` (support ``(-2, 2)``) or its 1st/2nd derivative at `t`.

    Args:
        t: positions, any shape (float64).
        order: 0, 1 or 2.
    """
    a = np.abs(t)
    inner, outer = a < 1, (a >= 1) & (a < 2)
    r = 2.0 - a
    if order == 0:
        return np.where(inner, 2 / 3 - a**2 + a**3 / 2, np.where(outer, r**3 / 6, 0.0))
    if order == 1:
        return np.where(inner, -2 * t + 1.5 * t * a, np.where(outer, -np.sign(t) * r**2 / 2, 0.0))
    if order == 2:
        return np.where(inner, -2 + 3 * a, np.where(outer, r, 0.0))
    raise ValueError(f"derivative order must be 0, 1 or 2, got {order}")


def bspline_gram(m: int, lo: float, hi: float, p: int, q: int) -> np.ndarray:
    """``(m, m)`` matrix ``G[k, l] = int_lo^hi B3^(p)(u - k) B3^(q)(u - l) du`` (exact).

    Gauss-Legendre quadrature on each unit knot interval inside ``[lo, hi]``: the integrand is a
    polynomial of degree at most 6 there.
    """
    edges = np.unique(np.clip(np.concatenate([[lo, hi], np.arange(np.floor(lo), np.ceil(hi) + 1)]),
                              lo, hi))
    a, b = edges[:-1], edges[1:]
    keep = b > a
    a, b = a[keep], b[keep]
    u = (a[:, None] + (b - a)[:, None] * _GAUSS_NODES[None, :]).ravel()
    w = ((b - a)[:, None] * _GAUSS_WEIGHTS[None, :]).ravel()
    k = np.arange(m, dtype=np.float64)
    bp = cubic_bspline_derivative(u[:, None] - k[None, :], p)
    bq = cubic_bspline_derivative(u[:, None] - k[None, :], q)
    return bp.T @ (w[:, None] * bq)


def _stacked_quadratic_form(coefficients: Tensor, stacks: Sequence[Tensor],
                            weights: Tensor) -> Tensor:
    """``sum_o weights[o] <c, (G_{D-1}[o_{D-1}] x ... x G_0[o_0]) c>`` in D + 1 einsums.

    Args:
        coefficients: ``(C, *M)``, spatial axes in tensor order.
        stacks: per ITK axis ``a`` a stack ``(k, m_a, m_a)`` of symmetric matrices.
        weights: ``(k,) * D``, indexed by ITK axis order.
    """
    d = len(stacks)
    space, out, orders = "zyx"[3 - d:], "uvw"[3 - d:], "ijk"[3 - d:]
    cur = "n" + space
    appended = ""
    t = coefficients
    for a in range(d):
        s_letter, o_letter, k_letter = space[d - 1 - a], out[d - 1 - a], orders[d - 1 - a]
        new = cur.replace(s_letter, o_letter) + k_letter
        t = torch.einsum(f"{cur},{k_letter}{o_letter}{s_letter}->{new}", t, stacks[a])
        cur, appended = new, appended + k_letter
    return torch.einsum(f"{cur},n{out},{appended}->", t, coefficients, weights)


def _subdivision_matrix(m: int, dtype: torch.dtype, device) -> Tensor:
    """``(2m - 3, m)`` matrix of exact cubic B-spline subdivision along one axis.

    Fine control point ``j`` sits at coarse index ``(j + 1) / 2``: odd ``j = 2k - 1`` gets
    ``(c[k-1] + 6 c[k] + c[k+1]) / 8``, even ``j = 2k`` gets ``(c[k] + c[k+1]) / 2``.
    """
    n = 2 * m - 3
    s = torch.zeros(n, m, dtype=torch.float64)
    for j in range(n):
        if j % 2:
            k = (j + 1) // 2
            s[j, k - 1], s[j, k], s[j, k + 1] = 1 / 8, 6 / 8, 1 / 8
        else:
            k = j // 2
            s[j, k], s[j, k + 1] = 0.5, 0.5
    return s.to(dtype=dtype, device=device)
