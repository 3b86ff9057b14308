"""Transforms mapping fixed-space world points to moving-space world points."""

from itreg.transforms.base import Identity, Transform
from itreg.transforms.bspline import BSpline
from itreg.transforms.compose import Compose, compose, exportable
from itreg.transforms.dense import DisplacementField, StationaryVelocityField
from itreg.transforms.inverse import IterativeInverse, invert_points
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
    "IterativeInverse",
    "LinearTransform",
    "Rigid",
    "Similarity",
    "StationaryVelocityField",
    "Transform",
    "Translation",
    "compose",
    "exportable",
    "hessian",
    "invert_points",
    "jacobian_determinant",
    "jacobian_matrix",
    "rotation_matrix",
    "spatial_gradient",
]
