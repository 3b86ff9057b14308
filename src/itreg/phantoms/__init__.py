"""Test and benchmark data with ground truth, built from the MNI template nilearn ships.

* :mod:`~itreg.phantoms.mni`: :func:`load_mni` (T1, GM, WM, CSF, brain mask; any spacing).
* :mod:`~itreg.phantoms.contrasts`: :func:`synthesize` T1/T2/PD-like images with seeded
  Rician noise and bias field (a quadratic one, or :func:`random_bias_field` of a given
  amplitude); :func:`labels`.
* :mod:`~itreg.phantoms.misalign`: random rigid/affine transforms with the papers' and the
  anchor benchmark's ranges; :func:`pad_image`.
* :mod:`~itreg.phantoms.deform`: :func:`random_ffd`, paper 003's random B-spline FFD, and
  :func:`invert_ffd`, its numerical inverse.
* :mod:`~itreg.phantoms.velocity`: :func:`velocity_diffeomorphism`, ``exp(v)`` of a random
  smooth velocity field (one or several scales; not a B-spline), and its inverse.
* :mod:`~itreg.phantoms.edges`: :func:`canny` and :func:`t1_edges` (paper 000's edge map).
* :mod:`~itreg.phantoms.groups`: :func:`brain_group`, N misaligned mixed-contrast images
  (paper 002's BrainWeb protocol).
* :mod:`~itreg.phantoms.dynamic`: :func:`dynamic_sequence`, time series with changing tissue
  contrasts and small rigid motion (paper 002's motion-correction experiment).
* :mod:`~itreg.phantoms.slices`: 2D axial slices with their world geometry.
* :mod:`~itreg.phantoms.pairs`: :func:`brain_pair` and :func:`brain_slice_pair`, misaligned
  multimodal pairs with their true transform.

* :mod:`~itreg.phantoms.write`: :func:`write_phantom`, a phantom and its ground truth on disk
  (``itreg phantom``).

Nothing is downloaded and nothing is cached between calls.
"""

from itreg.phantoms.contrasts import (
    CONTRAST_NAMES,
    CONTRASTS,
    LABELS,
    bias_field,
    labels,
    random_bias_field,
    rician_noise,
    synthesize,
)
from itreg.phantoms.deform import (
    BOUND_MODES,
    INJECTIVE_FRACTION,
    InverseReport,
    folding_fraction,
    invert_ffd,
    random_ffd,
)
from itreg.phantoms.dynamic import (
    DEFAULT_CURVES,
    DynamicSequence,
    dynamic_sequence,
    enhancement_curves,
    sequence_from_tissues,
)
from itreg.phantoms.edges import canny, t1_edges
from itreg.phantoms.groups import PhantomGroup, brain_group, group_from_tissues, zscore
from itreg.phantoms.misalign import (
    AffineParameters,
    anchor_affine,
    anchor_parameters,
    pad_grid,
    pad_image,
    random_affine,
    sample_affine_parameters,
)
from itreg.phantoms.mni import load_mni, mni_template_paths
from itreg.phantoms.pairs import (
    LINEAR_KINDS,
    PAIR_KINDS,
    PhantomPair,
    brain_center,
    brain_pair,
    brain_slice_pair,
    pair_from_tissues,
)
from itreg.phantoms.slices import axial_grid, axial_slice, axial_slices
from itreg.phantoms.velocity import (
    invert_velocity_diffeomorphism,
    random_velocity,
    velocity_diffeomorphism,
)
from itreg.phantoms.write import PHANTOM_KINDS, write_phantom

__all__ = [
    "BOUND_MODES",
    "CONTRASTS",
    "CONTRAST_NAMES",
    "DEFAULT_CURVES",
    "INJECTIVE_FRACTION",
    "LABELS",
    "LINEAR_KINDS",
    "PAIR_KINDS",
    "PHANTOM_KINDS",
    "AffineParameters",
    "DynamicSequence",
    "InverseReport",
    "PhantomGroup",
    "PhantomPair",
    "anchor_affine",
    "anchor_parameters",
    "axial_grid",
    "axial_slice",
    "axial_slices",
    "bias_field",
    "brain_center",
    "brain_group",
    "brain_pair",
    "brain_slice_pair",
    "canny",
    "dynamic_sequence",
    "enhancement_curves",
    "folding_fraction",
    "group_from_tissues",
    "invert_ffd",
    "invert_velocity_diffeomorphism",
    "labels",
    "load_mni",
    "mni_template_paths",
    "pad_grid",
    "pad_image",
    "pair_from_tissues",
    "random_affine",
    "random_bias_field",
    "random_ffd",
    "random_velocity",
    "rician_noise",
    "sample_affine_parameters",
    "sequence_from_tissues",
    "synthesize",
    "t1_edges",
    "velocity_diffeomorphism",
    "write_phantom",
    "zscore",
]
