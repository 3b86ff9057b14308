"""Transforms mapping fixed-space world points to moving-space world points."""

from itreg.transforms.base import Identity, Transform
from itreg.transforms.bspline import BSpline
from itreg.transforms.compose import Compose
from itreg.transforms.dense import DisplacementField, StationaryVelocityField
from itreg.transforms.jacobian import (
    hessian,
    jacobian_determinant,
    jacobian_matrix,
    spatial_gradient,
)
from itreg.transforms.linear import (
    Affine,
    LinearTransform,
    Rigid,
    Similarity,
    Translation,
    rotation_matrix,
)

__all__ = [
    "Affine",
    "BSpline",
    "Compose",
    "DisplacementField",
    "Identity",
    "LinearTransform",
    "Rigid",
    "Similarity",
    "StationaryVelocityField",
    "Transform",
    "Translation",
    "hessian",
    "jacobian_determinant",
    "jacobian_matrix",
    "rotation_matrix",
    "spatial_gradient",
]
