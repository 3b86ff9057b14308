"""Transforms mapping fixed-space world points to moving-space world points."""

from itreg.transforms.base import Identity, Transform
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
    "Identity",
    "LinearTransform",
    "Rigid",
    "Similarity",
    "Transform",
    "Translation",
    "rotation_matrix",
]
