"""Writing phantoms to disk: images, labels, masks, true transforms and a manifest.

:func:`write_phantom` builds a phantom (:func:`brain_pair` / :func:`brain_slice_pair`,
:func:`brain_group` or :func:`dynamic_sequence`) and writes it into a folder atomically
(:func:`itreg.io.atomic_output_dir`: a crash leaves no partial folder; an existing folder is
refused unless ``force``). Every transform maps the reference space's world points to the
image's (ITK's fixed -> moving convention):

* linear maps: an ITK ``AffineTransform`` file (``.tfm``) and its exact inverse;
* FFDs: the exact ITK ``BSplineTransform`` (``.tfm``), the same map as a displacement field
  image on the reference grid (``*_field.nii.gz``, ``d(x) = T(x) - x`` in LPS mm, read by
  ``SimpleITK.DisplacementFieldTransform``), and the numerical inverse as a displacement field
  on the image's grid (``*inverse_field.nii.gz``; exact at its voxel centres up to the
  solver's residual, reported in the manifest);
* velocity-field diffeomorphisms (``misalign="svf"``): the truth ``exp(v)`` is itself a
  displacement field on the reference grid (``transform_field.nii.gz``, exact; no ``.tfm``),
  with the numerical inverse as for FFDs.

``phantom.json`` lists every file with its role and the generation settings.

Files of a pair (``kind="pair"``): ``fixed``, ``moving``, ``fixed_labels``, ``moving_labels``,
``fixed_mask``, ``moving_mask``, ``fixed_edges`` (Canny of the fixed T1) as ``.nii.gz``;
``transform.tfm``; ``inverse.tfm`` (linear) or ``transform_field.nii.gz`` +
``inverse_field.nii.gz`` (FFD; SVF: the two fields only); ``fixed_landmarks.csv`` (100 seeded points in the fixed brain,
paper 000's FRE protocol) and ``moving_landmarks.csv`` (their images under the transform).
A group (``kind="group"``) writes ``image_XX``, ``labels_XX``, ``mask_XX``,
``transform_XX.tfm`` (common -> image), ``misalignment_XX`` (image -> common; ``.tfm`` or
``_field.nii.gz``), ``common_labels`` and ``common_mask``; a sequence (``kind="dynamic"``)
writes ``frame_XXX``, ``labels_XXX``, ``mask_XXX``, ``transform_XXX.tfm`` and
``misalignment_XXX.tfm``, and the enhancement curves in the manifest.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from itreg._version import __version__
from itreg.errors import ConfigError, unknown_name
from itreg.image import Image
from itreg.io import (
    atomic_output_dir,
    write_displacement_field,
    write_image,
    write_landmarks,
    write_transform,
)
from itreg.transforms import DisplacementField, Transform

#: Phantom kinds :func:`write_phantom` builds.
PHANTOM_KINDS = ("pair", "group", "dynamic")


def _write_linear_or_ffd(folder: Path, stem: str, transform: Transform, inverse: Transform,
                         reference_grid, files: dict, role: str, inverse_stem: str | None,
                         inverse_role: str) -> None:
    if not isinstance(transform, DisplacementField):  # a field is its own file, below
        write_transform(transform, folder / f"{stem}.tfm")
        files[f"{stem}.tfm"] = role
    if transform.is_linear:
        if inverse_stem is not None:
            write_transform(inverse, folder / f"{inverse_stem}.tfm")
            files[f"{inverse_stem}.tfm"] = inverse_role
    else:
        write_displacement_field(transform, reference_grid, folder / f"{stem}_field.nii.gz")
        files[f"{stem}_field.nii.gz"] = role + " (displacement field on the reference grid)"
        if inverse_stem is not None:
            write_displacement_field(inverse, inverse.grid,
                                     folder / f"{inverse_stem}_field.nii.gz")
            files[f"{inverse_stem}_field.nii.gz"] = inverse_role + " (numerical inverse field)"


def _image(folder: Path, name: str, image: Image, files: dict, role: str) -> None:
    write_image(image, folder / f"{name}.nii.gz")
    files[f"{name}.nii.gz"] = role


def _write_pair(folder: Path, pair, files: dict, manifest: dict, seed: int) -> None:
    from itreg.evaluate.landmarks import random_points_in_mask
    from itreg.phantoms.edges import canny

    _image(folder, "fixed", pair.fixed, files, "fixed image (template T1)")
    _image(folder, "moving", pair.moving, files, "moving image")
    _image(folder, "fixed_labels", pair.fixed_labels, files, "fixed labels (0 bg, 1 CSF, 2 GM, 3 WM)")
    _image(folder, "moving_labels", pair.moving_labels, files, "moving labels")
    _image(folder, "fixed_mask", pair.fixed_mask, files, "fixed brain mask")
    _image(folder, "moving_mask", pair.moving_mask, files, "moving brain mask")
    _image(folder, "fixed_edges", canny(pair.fixed, mask=None), files,
           "Canny edges of the fixed T1 (paper 000 experiment 3)")
    inverse = pair.inverse_transform
    if pair.true_transform.is_linear:
        _write_linear_or_ffd(folder, "transform", pair.true_transform, inverse, pair.fixed.grid,
                             files, "true transform fixed -> moving", "inverse",
                             "inverse transform moving -> fixed")
    elif isinstance(pair.true_transform, DisplacementField):  # velocity-field diffeomorphism
        write_displacement_field(pair.true_transform, pair.fixed.grid,
                                 folder / "transform_field.nii.gz")
        files["transform_field.nii.gz"] = ("true transform fixed -> moving: exp(v) as a "
                                           "displacement field (fixed grid; exact)")
        write_displacement_field(inverse, inverse.grid, folder / "inverse_field.nii.gz")
        files["inverse_field.nii.gz"] = "numerical inverse moving -> fixed (moving grid)"
    else:
        write_transform(pair.true_transform, folder / "transform.tfm")
        files["transform.tfm"] = "true transform fixed -> moving (ITK BSplineTransform)"
        write_displacement_field(pair.true_transform, pair.fixed.grid,
                                 folder / "transform_field.nii.gz")
        files["transform_field.nii.gz"] = "true transform as a displacement field (fixed grid)"
        write_displacement_field(inverse, inverse.grid, folder / "inverse_field.nii.gz")
        files["inverse_field.nii.gz"] = "numerical inverse moving -> fixed (moving grid)"
    points = random_points_in_mask(pair.fixed_mask, 100, seed)
    with torch.no_grad():
        moved = pair.true_transform(points.to(torch.float32)).to(torch.float64)
    write_landmarks(points, folder / "fixed_landmarks.csv")
    write_landmarks(moved, folder / "moving_landmarks.csv")
    files["fixed_landmarks.csv"] = "100 random fixed brain points (world mm, LPS)"
    files["moving_landmarks.csv"] = "their images under the true transform"
    if pair.parameters is not None:
        manifest["parameters"] = {
            "translation_mm": list(pair.parameters.translation),
            "angles_rad": list(pair.parameters.angles),
            "scales": list(pair.parameters.scales),
            "shear": list(pair.parameters.shear),
            "center_mm": pair.true_transform.center.detach().double().tolist(),
        }
    if pair.inverse_report is not None:
        manifest["inverse_residual"] = pair.inverse_report.as_dict()


def _write_group(folder: Path, group, files: dict, manifest: dict) -> None:
    for j, (img, lab, mask, t, mis) in enumerate(zip(group.images, group.labels, group.masks,
                                                     group.transforms, group.misalignments)):
        _image(folder, f"image_{j:02d}", img, files, f"image {j} ({group.contrasts[j]})")
        _image(folder, f"labels_{j:02d}", lab, files, f"labels of image {j}")
        _image(folder, f"mask_{j:02d}", mask, files, f"brain mask of image {j}")
        _write_linear_or_ffd(folder, f"transform_{j:02d}", t, mis, group.common_grid, files,
                             f"true transform common -> image {j}", f"misalignment_{j:02d}",
                             f"misalignment image {j} -> common (paper 002's phi_dag)")
    _image(folder, "common_labels", group.common_labels, files, "labels in common space")
    _image(folder, "common_mask", group.common_mask, files,
           "brain mask in common space (paper 002's foreground F)")
    manifest["contrasts"] = list(group.contrasts)
    reports = [r.as_dict() for r in group.inverse_reports if r is not None]
    if reports:
        manifest["inverse_residual"] = reports


def _write_dynamic(folder: Path, seq, files: dict, manifest: dict) -> None:
    for t, (img, lab, mask, tr, mis) in enumerate(zip(seq.frames, seq.labels, seq.masks,
                                                      seq.transforms, seq.misalignments)):
        _image(folder, f"frame_{t:03d}", img, files, f"frame {t}")
        _image(folder, f"labels_{t:03d}", lab, files, f"labels of frame {t}")
        _image(folder, f"mask_{t:03d}", mask, files, f"brain mask of frame {t}")
        _write_linear_or_ffd(folder, f"transform_{t:03d}", tr, mis, seq.common_mask.grid,
                             files, f"true transform common -> frame {t}",
                             f"misalignment_{t:03d}", f"misalignment frame {t} -> common")
    _image(folder, "common_labels", seq.common_labels, files, "labels in common space")
    _image(folder, "common_mask", seq.common_mask, files, "brain mask in common space")
    manifest["times_s"] = seq.times_s.tolist()
    manifest["curves"] = {"tissues": ["csf", "gm", "wm"], "intensity": seq.curves.tolist()}


def write_phantom(
    outdir: str | os.PathLike,
    kind: str = "pair",
    contrast: str | list[str] | tuple[str, ...] | None = None,
    misalign: str = "affine",
    spacing_mm: float = 1.0,
    ndim: int = 3,
    n: int = 3,
    frames: int = 20,
    seed: int = 0,
    control_spacing_mm: float = 20.0,
    sigma_mm: float | None = None,
    noise_sigma: float = 0.02,
    force: bool = False,
    bias: float | None = None,
    smoothness_mm: float | Sequence[float] = 20.0,
) -> dict:
    """Build a phantom and write it with its ground truth into `outdir` (atomically).

    Args:
        outdir: the output folder (must not exist unless `force`).
        kind: ``"pair"``, ``"group"`` or ``"dynamic"``.
        contrast: pair: the moving contrast (default ``"t2"``); group: the contrasts cycled
            over the images (default ``("t1", "t2", "pd")``); ignored for ``"dynamic"``.
        misalign: ``"rigid"``, ``"affine"``, ``"anchor"``, ``"ffd"`` (pair and group; a
            sequence always has small rigid motion) or ``"svf"`` (a random velocity-field
            diffeomorphism; pair only).
        spacing_mm: isotropic spacing in mm (1 = the template's; 2-4 for fast tests).
        ndim: 3, or 2 for the middle axial slice.
        n: number of images of a group.
        frames: number of frames of a sequence.
        seed: seed of everything random.
        control_spacing_mm: FFD control spacing in mm.
        sigma_mm: FFD coefficient standard deviation, or velocity RMS per component
            (``"svf"``), in mm; None: 6 (FFD) or 4 (SVF).
        noise_sigma: Rician noise sigma of the synthetic images.
        force: replace an existing folder.
        smoothness_mm: Gaussian smoothness of the velocity field in mm; several values give a
            mixture of scales (``misalign="svf"``).
        bias: amplitude ``a`` of a smooth random multiplicative bias field of about
            ``1 +- a`` on the moving image of a pair (every image of a group), in place of
            the standard quadratic 0.80-1.17 field (see
            :func:`~itreg.phantoms.contrasts.random_bias_field`); None keeps the standard one.

    Returns:
        The manifest (also written as ``phantom.json``).

    Raises:
        ConfigError: unknown kind, contrast or misalignment, or invalid numbers.
        OutputExistsError: `outdir` exists and `force` is False.
    """
    from itreg.phantoms.dynamic import dynamic_sequence
    from itreg.phantoms.groups import brain_group
    from itreg.phantoms.pairs import PAIR_KINDS, brain_pair, brain_slice_pair

    if kind not in PHANTOM_KINDS:
        raise unknown_name("phantom kind", kind, PHANTOM_KINDS)
    if ndim not in (2, 3):
        raise ConfigError(f"ndim must be 2 or 3, got {ndim}")
    if not (spacing_mm > 0):
        raise ConfigError(f"spacing must be > 0 mm, got {spacing_mm}")
    if kind != "dynamic" and misalign not in PAIR_KINDS:
        raise unknown_name("misalignment", misalign, PAIR_KINDS)
    if misalign == "svf" and kind != "pair":
        raise ConfigError("misalign 'svf' (velocity-field diffeomorphism) makes pairs; use "
                          "--kind pair")
    if bias is not None and kind == "dynamic":
        raise ConfigError("a bias amplitude applies to pair and group phantoms, not 'dynamic'")
    field = {} if bias is None else {"bias": float(bias)}
    manifest: dict = {
        "itreg_version": __version__,
        "kind": kind,
        "ndim": ndim,
        "spacing_mm": spacing_mm,
        "seed": seed,
        "conventions": "world = ITK LPS mm; every transform maps reference-space points to the "
                       "image's points (fixed -> moving); displacement fields hold T(x) - x",
    }
    # Build first (may raise on bad settings) so that nothing is written on error.
    if kind == "pair":
        c = contrast or "t2"
        if not isinstance(c, str):
            raise ConfigError("a pair has one moving contrast")
        build = brain_pair if ndim == 3 else brain_slice_pair
        phantom = build(spacing_mm, c, misalign, seed, noise_sigma=noise_sigma,
                        control_spacing_mm=control_spacing_mm, sigma_mm=sigma_mm,
                        smoothness_mm=smoothness_mm, **field)
        manifest.update(contrast=c, misalign=misalign)
    elif kind == "group":
        cs = (contrast,) if isinstance(contrast, str) else tuple(contrast or ("t1", "t2", "pd"))
        phantom = brain_group(n, cs, misalign, ndim, spacing_mm, True, seed,
                              noise_sigma=noise_sigma, control_spacing_mm=control_spacing_mm,
                              sigma_mm=6.0 if sigma_mm is None else sigma_mm, **field)
        manifest.update(misalign=misalign, n=n, zscored=True)
    else:
        phantom = dynamic_sequence(frames, spacing_mm, ndim, seed, noise_sigma=noise_sigma)
        manifest.update(misalign="rigid motion", frames=frames)
    if bias is not None:
        manifest["bias"] = {"field": "random", "amplitude": float(bias)}
    if misalign == "ffd" and kind != "dynamic":
        manifest["ffd"] = {"control_spacing_mm": control_spacing_mm,
                           "sigma_mm": 6.0 if sigma_mm is None else sigma_mm}
    if misalign == "svf" and kind == "pair":
        from itreg.phantoms.pairs import DEFAULT_SIGMA_MM
        from itreg.phantoms.velocity import smoothness_scales

        manifest["svf"] = {"smoothness_mm": list(smoothness_scales(smoothness_mm)),
                           "sigma_mm": DEFAULT_SIGMA_MM["svf"] if sigma_mm is None else sigma_mm}
    files: dict[str, str] = {}
    with atomic_output_dir(outdir, force=force) as tmp:
        folder = Path(tmp)
        if kind == "pair":
            _write_pair(folder, phantom, files, manifest, seed)
        elif kind == "group":
            _write_group(folder, phantom, files, manifest)
        else:
            _write_dynamic(folder, phantom, files, manifest)
        manifest["files"] = files
        (folder / "phantom.json").write_text(json.dumps(manifest, indent=2) + "\n",
                                             encoding="utf-8")
    return manifest
