"""Dynamic-contrast sequences: tissue contrasts that change over time, with small motion.

A stand-in for paper 002's motion-correction (MoCo perfusion) experiment, built from the MNI
anatomy. Frame ``t`` (time ``t * frame_interval_s``) shows the tissues with intensities

    ``s_k(t) = base_k + amplitude_k * g(t; peak_k)``,  ``g(t; p) = (t/p)^a exp(a (1 - t/p))``

a gamma-variate enhancement curve per tissue ``k`` (peak 1 at ``t = p``, ``a = 3``) on top of a
T1-weighted baseline (CSF dark, WM bright). Defaults (:data:`DEFAULT_CURVES`): GM enhances
early and strongly, WM later and less, CSF barely and late, so the GM/WM contrast inverts
around GM's peak: intensity-based similarity across frames must be multimodal.

Frame ``t`` sees the anatomy through a small random rigid transform ``T_t`` (common space ->
frame ``t``; rotation about the brain centre): ``frame_t(T_t(x)) = s(x, t)`` exactly (linear
maps invert exactly). The reference frame (default 0) has ``T = identity``; the others get
per-axis translations of magnitude U(0, ``max_translation_mm``) and angles of magnitude
U(0, ``max_rotation_rad``), random signs, drawn independently per frame. Each frame gets seeded
Rician noise. All frames share the common grid padded by ``pad_mm``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms.contrasts import labels, rician_noise
from itreg.phantoms.misalign import pad_grid, sample_affine_parameters
from itreg.phantoms.mni import load_mni
from itreg.phantoms.pairs import brain_center
from itreg.phantoms.slices import axial_slices
from itreg.transforms import Affine
from itreg.warp import resample

#: Per tissue: (baseline, enhancement amplitude, time to peak as a fraction of the sequence).
DEFAULT_CURVES: dict[str, tuple[float, float, float]] = {
    "csf": (0.20, 0.05, 0.80),
    "gm": (0.50, 0.50, 0.30),
    "wm": (0.75, 0.20, 0.45),
}

#: Shape parameter ``a`` of the gamma-variate curve.
GAMMA_SHAPE = 3.0

_TISSUES = ("csf", "gm", "wm")


@dataclass(frozen=True, eq=False)
class DynamicSequence:
    """A dynamic-contrast time series with ground truth.

    Attributes:
        frames: float32 images, one per time point, on one grid.
        labels: tissue labels of each frame (0 background, 1 CSF, 2 GM, 3 WM).
        masks: brain mask of each frame (uint8).
        transforms: ``T_t``, common space -> frame ``t`` (Affine; identity for the reference).
        misalignments: ``T_t^-1``, frame ``t`` -> common space (paper 002's ``phi_dag``).
        curves: ``(frames, 3)`` noise-free intensities of CSF, GM, WM at each frame.
        times_s: ``(frames,)`` acquisition times in seconds.
        common_labels: labels in common space.
        common_mask: brain mask in common space.
    """

    frames: list[Image]
    labels: list[Image]
    masks: list[Image]
    transforms: list[Affine]
    misalignments: list[Affine]
    curves: Tensor
    times_s: Tensor
    common_labels: Image
    common_mask: Image

    @property
    def grid(self) -> Grid:
        """The frames' grid."""
        return self.frames[0].grid


def enhancement_curves(
    frames: int,
    curves: Mapping[str, tuple[float, float, float]] | None = None,
) -> Tensor:
    """Tissue intensities over time, ``(frames, 3)`` for CSF, GM, WM (see the module docstring).

    Args:
        frames: number of time points (>= 2).
        curves: per tissue ``(baseline, amplitude, peak fraction in (0, 1])``;
            ``None``: :data:`DEFAULT_CURVES`.

    Returns:
        float64 tensor ``(frames, 3)``.
    """
    curves = dict(DEFAULT_CURVES if curves is None else curves)
    missing = [k for k in _TISSUES if k not in curves]
    if missing:
        raise ConfigError(f"curves need entries for {list(_TISSUES)}; missing {missing}")
    t = torch.arange(int(frames), dtype=torch.float64)
    span = max(int(frames) - 1, 1)
    cols = []
    for k in _TISSUES:
        base, amp, peak = (float(v) for v in curves[k])
        if not 0 < peak <= 1:
            raise ConfigError(f"peak fraction of {k!r} must be in (0, 1], got {peak}")
        u = t / (peak * span)
        g = u.pow(GAMMA_SHAPE) * torch.exp(GAMMA_SHAPE * (1 - u))
        cols.append(base + amp * g)
    return torch.stack(cols, dim=1)


def sequence_from_tissues(
    tissues: Mapping[str, Image],
    frames: int = 20,
    seed: int = 0,
    max_translation_mm: float = 3.0,
    max_rotation_rad: float = 0.03,
    reference_frame: int | None = 0,
    noise_sigma: float = 0.02,
    pad_mm: float = 10.0,
    frame_interval_s: float = 1.0,
    curves: Mapping[str, tuple[float, float, float]] | None = None,
) -> DynamicSequence:
    """Build a dynamic sequence from tissue maps (2D or 3D); see :func:`dynamic_sequence`."""
    if int(frames) < 2:
        raise ConfigError(f"a sequence needs at least 2 frames, got {frames}")
    if not (max_translation_mm >= 0 and 0 <= max_rotation_rad < math.pi):
        raise ConfigError("motion ranges must be >= 0 (rotation below pi)")
    if reference_frame is not None and not 0 <= int(reference_frame) < int(frames):
        raise ConfigError(f"reference_frame must be in [0, {frames}), got {reference_frame}")
    for key in (*_TISSUES, "mask"):
        if key not in tissues:
            raise ConfigError(f"tissue map {key!r} missing; have {sorted(tissues)}")
    mask = tissues["mask"]
    grid = mask.grid
    ndim = grid.ndim
    center = brain_center(mask)
    out_grid = pad_grid(grid, pad_mm)
    table = enhancement_curves(frames, curves)
    seeds = torch.randint(0, 2**31 - 1, (int(frames), 2),
                          generator=torch.Generator().manual_seed(int(seed))).tolist()
    stack = torch.cat([tissues[k].data.to(torch.float32) for k in _TISSUES]
                      + [(mask.data != 0).to(torch.float32)])
    source = Image(stack, grid, is_label=False)
    imgs, labs, masks, fwd, inv = [], [], [], [], []
    for t in range(int(frames)):
        if reference_frame is not None and t == int(reference_frame):
            transform = Affine(ndim, center=center, device=mask.device)
        else:
            params = sample_affine_parameters(ndim, seeds[t][0], "rigid",
                                              translation_mm=(0.0, float(max_translation_mm)),
                                              rotation_rad=(0.0, float(max_rotation_rad)))
            transform = params.to_affine(center, dtype=torch.float32, device=mask.device)
        inverse = transform.inverse()
        with torch.no_grad():
            moved = resample(source, inverse, out_grid, mode="linear").data.clamp(0.0, 1.0)
        fmask = (moved[-1:] >= 0.5).to(torch.uint8)
        maps = {k: Image(moved[i:i + 1], out_grid, is_label=False) for i, k in enumerate(_TISSUES)}
        maps["csf"] = maps["csf"].with_data(maps["csf"].data * fmask, is_label=False)
        maps["mask"] = Image(fmask, out_grid, is_label=True)
        signal = sum(float(table[t, i]) * maps[k].data for i, k in enumerate(_TISSUES))
        image = rician_noise(Image(signal, out_grid, is_label=False), noise_sigma,
                             seed=seeds[t][1])
        imgs.append(image)
        labs.append(labels(maps))
        masks.append(maps["mask"])
        fwd.append(transform)
        inv.append(inverse)
    times = torch.arange(int(frames), dtype=torch.float64) * float(frame_interval_s)
    return DynamicSequence(imgs, labs, masks, fwd, inv, table, times, labels(tissues), mask)


def dynamic_sequence(
    frames: int = 20,
    spacing_mm: float | None = 2.0,
    ndim: int = 2,
    seed: int = 0,
    max_translation_mm: float = 3.0,
    max_rotation_rad: float = 0.03,
    reference_frame: int | None = 0,
    noise_sigma: float = 0.02,
    pad_mm: float = 10.0,
    frame_interval_s: float = 1.0,
    curves: Mapping[str, tuple[float, float, float]] | None = None,
    slice_index: int | None = None,
    device: torch.device | str | None = None,
) -> DynamicSequence:
    """A dynamic-contrast sequence of the MNI anatomy with small rigid motion between frames.

    Args:
        frames: number of time points (>= 2).
        spacing_mm: isotropic spacing in mm (see :func:`load_mni`).
        ndim: 2 (the axial slice `slice_index`, default the middle) or 3.
        seed: seed of the motion and the noise.
        max_translation_mm: largest per-axis translation magnitude of a frame, mm.
        max_rotation_rad: largest per-angle rotation magnitude of a frame, radians.
        reference_frame: frame with no motion (``None``: every frame moves).
        noise_sigma: Rician noise sigma (intensities are about [0, 1]).
        pad_mm: margin (mm) around the common grid that makes the frames' grid.
        frame_interval_s: time between frames in seconds.
        curves: per tissue ``(baseline, amplitude, peak fraction)``; ``None``:
            :data:`DEFAULT_CURVES`.
        slice_index: axial slice for ``ndim=2``.
        device: device of the images and transforms.

    Returns:
        The :class:`DynamicSequence`.

    Raises:
        ConfigError: invalid frame count, motion ranges, reference frame or curves.
        GeometryError: ndim not 2 or 3.
    """
    if ndim not in (2, 3):
        raise GeometryError(f"dynamic sequences are 2D or 3D, got ndim={ndim}")
    tissues = load_mni(spacing_mm, device=device)
    if ndim == 2:
        tissues = axial_slices(tissues, slice_index)
    return sequence_from_tissues(tissues, frames, seed, max_translation_mm, max_rotation_rad,
                                 reference_frame, noise_sigma, pad_mm, frame_interval_s, curves)
