"""Linear transforms against SimpleITK's Euler, Similarity, Translation and Affine transforms."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from itreg.errors import GeometryError
from itreg.transforms import Affine, Rigid, Similarity, Translation

F64 = torch.float64


def _points(ndim: int, n: int = 50, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, ndim, generator=g, dtype=F64) - 0.5) * 200.0


def _sitk_map(tx: sitk.Transform, points: torch.Tensor) -> torch.Tensor:
    return torch.tensor([tx.TransformPoint(p) for p in points.tolist()], dtype=F64)


def test_translation_matches_sitk():
    t = Translation(3, translation=[1.5, -2.0, 3.25], dtype=F64)
    ref = sitk.TranslationTransform(3, [1.5, -2.0, 3.25])
    pts = _points(3)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-9, rtol=0)


def test_rigid2d_matches_euler2d():
    c, tr, ang = [10.0, -5.0], [3.0, 4.0], 0.4
    t = Rigid(2, center=c, translation=tr, angles=[ang], dtype=F64)
    ref = sitk.Euler2DTransform(c, ang, tr)
    pts = _points(2)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-9, rtol=0)


def test_rigid3d_matches_euler3d():
    c, tr, angles = [10.0, -5.0, 2.0], [3.0, 4.0, -1.0], [0.3, -0.2, 0.5]
    t = Rigid(3, center=c, translation=tr, angles=angles, dtype=F64)
    ref = sitk.Euler3DTransform(c, *angles, tr)
    pts = _points(3)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-9, rtol=0)
    np.testing.assert_allclose(t.matrix().detach().numpy().ravel(), ref.GetMatrix(), atol=1e-12)
    np.testing.assert_allclose(t.offset().detach().numpy(), _sitk_offset(ref), atol=1e-9)


def _sitk_offset(tx) -> np.ndarray:
    # ITK offset = T(0)
    return np.asarray(tx.TransformPoint([0.0] * tx.GetDimension()))


def test_similarity2d_matches_sitk():
    c, tr, ang, s = [1.0, 2.0], [-3.0, 0.5], -0.7, 1.3
    t = Similarity(2, center=c, translation=tr, angles=[ang], scale=s, dtype=F64)
    ref = sitk.Similarity2DTransform(s, ang, tr, c)
    pts = _points(2)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-9, rtol=0)


def test_similarity3d_matches_sitk_similarity():
    c, tr, angles, s = [1.0, 2.0, -4.0], [-3.0, 0.5, 2.0], [0.1, 0.2, -0.3], 0.8
    t = Similarity(3, center=c, translation=tr, angles=angles, scale=s, dtype=F64)
    ref = sitk.Similarity3DTransform()
    ref.SetCenter(c)
    ref.SetMatrix(sitk.Euler3DTransform(c, *angles).GetMatrix())
    ref.SetScale(s)
    ref.SetTranslation(tr)
    pts = _points(3)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-8, rtol=0)


@pytest.mark.parametrize("ndim", [2, 3])
def test_affine_matches_sitk(ndim):
    g = torch.Generator().manual_seed(ndim)
    a = torch.eye(ndim, dtype=F64) + 0.2 * torch.randn(ndim, ndim, generator=g, dtype=F64)
    c = torch.randn(ndim, generator=g, dtype=F64) * 10
    tr = torch.randn(ndim, generator=g, dtype=F64) * 5
    t = Affine(ndim, center=c, translation=tr, matrix=a, dtype=F64)
    ref = sitk.AffineTransform(a.numpy().ravel().tolist(), tr.tolist(), c.tolist())
    pts = _points(ndim)
    torch.testing.assert_close(t(pts), _sitk_map(ref, pts), atol=1e-9, rtol=0)
    np.testing.assert_allclose(t.offset().detach().numpy(), _sitk_offset(ref), atol=1e-9)
    # from_matrix round trip
    t2 = Affine.from_matrix(a.numpy(), t.offset().detach().numpy(), center=[0.0] * ndim, dtype=F64)
    torch.testing.assert_close(t2(pts), t(pts), atol=1e-9, rtol=0)


def test_wrong_point_dimension_raises():
    with pytest.raises(GeometryError):
        Rigid(3)(torch.zeros(4, 2))


_angle = st.floats(-1.2, 1.2)
_coord = st.floats(-50.0, 50.0)


@settings(max_examples=30, deadline=None)
@given(
    angles=st.lists(_angle, min_size=3, max_size=3),
    translation=st.lists(_coord, min_size=3, max_size=3),
    center=st.lists(_coord, min_size=3, max_size=3),
    scale=st.floats(0.5, 2.0),
)
def test_inverse_composes_to_identity(angles, translation, center, scale):
    t = Similarity(3, center=center, translation=translation, angles=angles, scale=scale,
                   dtype=F64)
    inv = t.inverse()
    pts = _points(3, n=20)
    torch.testing.assert_close(inv(t(pts)), pts, atol=1e-8, rtol=0)
    torch.testing.assert_close(t(inv(pts)), pts, atol=1e-8, rtol=0)


@settings(max_examples=30, deadline=None)
@given(
    entries=st.lists(st.floats(-0.4, 0.4), min_size=4, max_size=4),
    translation=st.lists(_coord, min_size=2, max_size=2),
    center=st.lists(_coord, min_size=2, max_size=2),
    new_center=st.lists(_coord, min_size=2, max_size=2),
)
def test_set_center_keeps_the_map(entries, translation, center, new_center):
    a = np.eye(2) + np.asarray(entries).reshape(2, 2)
    t = Affine(2, center=center, translation=translation, matrix=a, dtype=F64)
    pts = _points(2, n=20)
    before = t(pts).detach()
    t.set_center(new_center)
    torch.testing.assert_close(t(pts).detach(), before, atol=1e-8, rtol=0)
    np.testing.assert_allclose(t.center.numpy(), new_center)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Translation(2, translation=[0.3, -0.2], dtype=F64),
        lambda: Rigid(3, center=[1.0, 2.0, 3.0], angles=[0.1, 0.2, 0.3], dtype=F64),
        lambda: Similarity(2, center=[1.0, 2.0], angles=[0.3], scale=1.1, dtype=F64),
        lambda: Affine(3, center=[1.0, -1.0, 0.5], dtype=F64),
    ],
)
def test_gradcheck_parameters(make):
    t = make()
    pts = _points(t.ndim, n=4)
    names = [n for n, _ in t.named_parameters()]

    def call(*ps):
        return torch.func.functional_call(t, dict(zip(names, ps)), (pts,))

    inputs = tuple(p.detach().clone().requires_grad_(True) for _, p in t.named_parameters())
    assert torch.autograd.gradcheck(call, inputs)
