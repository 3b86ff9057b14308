"""Applying a trained deep-combined-computing (DCC) model to a group of images.

A DCC network (:class:`itreg.nets.dcc.DCCNet`, trained by :func:`itreg.train.dcc.train_dcc`)
registers a group of N multimodal images to a common space and segments them in one forward
pass (paper 002, sec. 3.5). This module is its front door, the counterpart of
:func:`itreg.groupwise.register_group` for iterative X-CoReg::

    apply_dcc(model, images, domains=None, *, grid=None, normalize="zscore", zeta=None,
              priors=None, seed=0, device=None, threads=None) -> DCCResult
    save_dcc(result, outdir, force=False, inputs=None) -> Path

- ``model``: a model file (kind ``"dcc"``, read with ``weights_only=True``) or a
  :class:`~itreg.nets.dcc.DCCNet`.
- ``images``: N >= 2 images or image files, one channel each, all 2D or all 3D (any grids).
- ``domains``: the modality of each image, as domain indices or as the names stored in the
  model (e.g. ``["t1", "t2", "pd"]``); default ``0..N-1`` when N equals the model's number of
  domains.
- ``grid``: the common grid (default: image 0's grid, resampled to the spacing the model was
  trained at). Every image is resampled onto it (identity, world coordinates) for the network.
- ``zeta``, ``priors``: the test-time probability clip (paper: 0.01) and the images whose
  ``rho_hat`` multiply into the posterior of Eq. 53 (default: the model file's, i.e. the
  images labelled in training).

:class:`DCCResult` holds, like a :class:`~itreg.groupwise.GroupResult`:

- ``transforms[j]``: ``phi_j``, mapping **common-space world points to image j's world
  points** (itreg's fixed -> moving convention), a ``Compose(Translation (identity),
  DisplacementField)`` whose field is the network's displacement on the common grid, so
  ``warped_j(x) = image_j(phi_j(x))``;
- ``warped``: each normalised image resampled onto the common grid through ``phi_j``;
- ``segmentations[j]`` / ``probabilities_per_image[j]``: ``argmax rho_hat_j`` (uint8 labels
  ``0..K-1``, the training labels) and ``rho_hat_j`` on image ``j``'s own grid;
- ``probabilities`` / ``segmentation``: the common-space posterior ``Z^[2]`` (Eq. 53) and its
  argmax on the common grid (0 outside the overlap of all images);
- ``wall_time_s``: seconds for the network and the posterior (not the output resampling).

:func:`save_dcc` writes, atomically, what :func:`itreg.groupwise.save_group` writes for an
iterative run (``j/warped.nii.gz``, ``j/transform.tfm``, ``j/displacement.nii.gz``,
``segmentation.nii.gz``, ``probabilities.nii.gz``, ``template.nii.gz``, ``report.json``; by
calling :func:`itreg.groupwise.write_group`) plus ``j/segmentation.nii.gz`` and
``j/probabilities.nii.gz`` on each image's own grid.

Example:
    >>> from itreg.nets.dcc_apply import apply_dcc, save_dcc
    >>> result = apply_dcc("dcc.pt", ["t1.nii.gz", "t2.nii.gz", "pd.nii.gz"])  # doctest: +SKIP
    >>> save_dcc(result, "out/")                                                # doctest: +SKIP
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Compose, DisplacementField, Transform, Translation

PathLike = str | os.PathLike

__all__ = ["DCCResult", "apply_dcc", "save_dcc"]


class DCCResult:
    """The outcome of :func:`apply_dcc` (see the module docstring).

    Attributes:
        transforms: ``phi_j`` per image (common-space world points -> image ``j``'s).
        grid: the common grid.
        images: the normalised input images on their own grids.
        probabilities_per_image: ``K``-channel ``rho_hat_j`` on image ``j``'s grid.
        segmentations: uint8 ``argmax rho_hat_j`` on image ``j``'s grid.
        overlap: ``grid.shape`` bool, the common points inside every warped image.
        wall_time_s: seconds for the network and the posterior.
        settings: the call's settings.
    """

    def __init__(self, transforms: list[Transform], grid: Grid, images: list[Image],
                 probabilities_per_image: list[Image], common_probabilities: Tensor,
                 overlap: Tensor, wall_time_s: float, settings: dict[str, Any]) -> None:
        self.transforms = transforms
        self.grid = grid
        self.images = images
        self.probabilities_per_image = probabilities_per_image
        self.segmentations = [
            Image(p.data.argmax(dim=0).to(torch.uint8), p.grid, is_label=True)
            for p in probabilities_per_image]
        self._common = common_probabilities
        self.overlap = overlap
        self.wall_time_s = float(wall_time_s)
        self.settings = dict(settings)

    @functools.cached_property
    def warped(self) -> list[Image]:
        """Each normalised image resampled onto the common grid through ``phi_j``."""
        from itreg.warp import resample

        with torch.no_grad():
            return [resample(img, t, self.grid, mode="linear")
                    for img, t in zip(self.images, self.transforms)]

    @property
    def probabilities(self) -> Image:
        """``K``-channel posterior ``Z^[2]`` (Eq. 53) on the common grid (0 outside the
        overlap)."""
        return Image(self._common, self.grid, is_label=False)

    @property
    def segmentation(self) -> Image:
        """uint8 ``argmax`` of :attr:`probabilities` (labels ``0..K-1``; 0 outside the
        overlap)."""
        seg = self._common.argmax(dim=0).to(torch.uint8)
        seg[~self.overlap] = 0
        return Image(seg, self.grid, is_label=True)

    @functools.cached_property
    def template(self) -> Image:
        """The mean of the warped images."""
        data = torch.stack([w.data for w in self.warped]).mean(dim=0)
        return Image(data, self.grid, is_label=False)

    def report(self, history: bool = True) -> dict:
        """A JSON-serialisable summary (settings, grid, wall time)."""
        from itreg.runtime import provenance

        return {"itreg_report": 1, "kind": "groupwise-dcc", "provenance": provenance(),
                "wall_time_s": round(self.wall_time_s, 6), "settings": self.settings,
                "images": len(self.images),
                "grid": {"size": list(self.grid.size), "spacing": list(self.grid.spacing)},
                "overlap_fraction": float(self.overlap.float().mean()),
                "linear": [{"matrix": torch.eye(self.grid.ndim).double().tolist(),
                            "offset": [0.0] * self.grid.ndim} for _ in self.images]}

    def __repr__(self) -> str:
        return (f"DCCResult(images={len(self.images)}, grid={self.grid!r}, "
                f"wall_time_s={self.wall_time_s:.3f})")


def _load(model: Any):
    from itreg.blocks.modelfile import build_model
    from itreg.nets.dcc import MODEL_KIND, DCCNet

    if isinstance(model, DCCNet):
        return model, {}
    if isinstance(model, (str, os.PathLike)):
        net, extra = build_model(model, expected_kind=MODEL_KIND)
        return net, extra.get("inference", {}) if isinstance(extra, dict) else {}
    raise ConfigError(f"model must be a DCC model file or a DCCNet, got {type(model).__name__}")


def _domain_indices(net, domains: Sequence[int | str] | None, n: int) -> list[int]:
    names = net.domain_names or []
    if domains is None:
        if n != net.domains:
            known = ", ".join(names) or "unnamed"
            raise ConfigError(f"the model knows {net.domains} domains ({known}) but {n} images "
                              "were given; pass domains=[...], one per image")
        return list(range(n))
    if len(domains) != n:
        raise ConfigError(f"{len(domains)} domains for {n} images")
    out = []
    for d in domains:
        if isinstance(d, str):
            if d not in names:
                known = ", ".join(names) or f"unnamed, 0..{net.domains - 1}"
                raise ConfigError(f"unknown domain {d!r}; the model's domains are: {known}")
            out.append(names.index(d))
        elif isinstance(d, bool) or int(d) != d or not 0 <= int(d) < net.domains:
            raise ConfigError(f"domain index {d!r} is not in 0..{net.domains - 1}")
        else:
            out.append(int(d))
    return out


def apply_dcc(
    model: PathLike | Any,
    images: Sequence[Image | PathLike],
    domains: Sequence[int | str] | None = None,
    *,
    grid: Grid | None = None,
    normalize: str = "zscore",
    zeta: float | None = None,
    priors: Sequence[int] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    threads: int | None = None,
) -> DCCResult:
    """Register and segment a group with a trained DCC network (see the module docstring).

    Args:
        model: a ``"dcc"`` model file or a :class:`~itreg.nets.dcc.DCCNet`.
        images: N >= 2 images or image files (one channel, all 2D or all 3D).
        domains: per image, a domain index or name of the model (default ``0..N-1``).
        grid: the common grid (default: image 0's, at the model's training spacing).
        normalize: ``"zscore"`` (per image, as in training) or ``"none"``.
        zeta: probability clip of the posterior (default: the model file's, else 0.01).
        priors: images whose ``rho_hat`` enter the posterior as label models (Eq. 53;
            default: the model file's).
        seed: seed of the posterior's EM sample.
        device: where to run (default: the images' device).
        threads: torch CPU threads for this call (restored afterwards).

    Returns:
        :class:`DCCResult`.

    Raises:
        ConfigError: fewer than two images, bad domains or settings, not a DCC model.
        ModelFileError: an unreadable or foreign model file.
        GeometryError: mixed dimensions, a model of another dimension, no overlap.
        InvalidImageError: NaN/Inf or constant images.
    """
    from itreg.groupwise.api import NORMALISATIONS, check_overlap, load_group
    from itreg.nets.dcc import (
        clip_probabilities,
        common_anatomy,
        warp_group,
        world_displacements,
    )
    from itreg.runtime import limited_threads
    from itreg.warp import resample

    imgs = load_group(images, normalize, "a DCC group")
    net, inference = _load(model)
    if imgs[0].ndim != net.ndim:
        raise GeometryError(f"the model is {net.ndim}D but the images are {imgs[0].ndim}D")
    imgs = [NORMALISATIONS[normalize](img, i) for i, img in enumerate(imgs)]
    n = len(imgs)
    dom = _domain_indices(net, domains, n)
    common = grid or imgs[0].grid
    if common.ndim != net.ndim:
        raise GeometryError(f"the common grid is {common.ndim}D, the model {net.ndim}D")
    if grid is None and net.spacing_mm is not None and not all(
            abs(a - b) < 1e-6 for a, b in zip(common.spacing, net.spacing_mm)):
        common = common.with_spacing(net.spacing_mm)
    check_overlap(imgs, common)
    zeta = float(inference.get("zeta", 0.01) if zeta is None else zeta)
    pri = [int(j) for j in (inference.get("priors", []) if priors is None else priors)]
    for j in pri:
        if not 0 <= j < n:
            raise ConfigError(f"prior image {j} is not in 0..{n - 1}")
    levels = int(inference.get("levels", 32))
    rate = float(inference.get("sample_rate", 0.1))
    dev = torch.device(device) if device is not None else imgs[0].device
    settings = {"model": str(model) if isinstance(model, (str, os.PathLike)) else "DCCNet",
                "domains": dom, "normalize": normalize, "zeta": zeta, "priors": pri,
                "levels": levels, "sample_rate": rate, "seed": int(seed),
                "model_config": net.config()}
    with limited_threads(threads), torch.no_grad():
        t0 = time.perf_counter()
        net = net.to(dev).eval()
        x = torch.stack([resample(img.to(dev), None, common, mode="linear").data
                         for img in imgs])  # (N, 1, *S)
        out = net(x[None], torch.tensor(dom, device=dev))
        disp = world_displacements(out.field[0], common, net.flow, net.svf_steps)
        rho_hat = clip_probabilities(out.probabilities[0], zeta, dim=1)
        warped, inside = warp_group(torch.cat([x, rho_hat], dim=1), disp, common)
        overlap = inside.reshape(n, -1).all(dim=0)
        if int(overlap.sum()) == 0:
            raise GeometryError("the registered images do not overlap on the common grid")
        k = net.classes
        prior_maps = warped[pri, 1:].reshape(len(pri), k, -1) if pri else None
        gamma, _ = common_anatomy([x[j, 0] for j in range(n)], list(rho_hat),
                                  warped[:, 0].reshape(n, -1), overlap, prior_maps, levels,
                                  rate, torch.Generator().manual_seed(int(seed)))
        common_probs = torch.zeros(common.numel, k, dtype=gamma.dtype, device=gamma.device)
        common_probs[overlap] = gamma
        common_probs = common_probs.T.reshape(k, *common.shape)
        wall = time.perf_counter() - t0
        transforms: list[Transform] = [
            Compose(Translation(common.ndim, dtype=disp.dtype, device=dev),
                    DisplacementField(disp[j], common, learnable=False)) for j in range(n)]
        per_image = [resample(Image(out.probabilities[0, j], common, is_label=False), None,
                              img.grid, mode="linear")
                     for j, img in enumerate(imgs)]
    return DCCResult(transforms, common, [img.to(dev) for img in imgs], per_image, common_probs,
                     overlap.reshape(common.shape), wall, settings)


def save_dcc(result: DCCResult, outdir: PathLike, force: bool = False,
             inputs: Sequence[Any] | None = None, protect=None) -> Path:
    """Write a DCC result to `outdir` atomically: the groupwise layout of
    :func:`itreg.groupwise.save_group` (the result duck-types a ``GroupResult``) plus
    ``j/segmentation.nii.gz`` and ``j/probabilities.nii.gz`` per image (see the module
    docstring). Refusals are those of ``save_group``."""
    from itreg import io
    from itreg.groupwise.api import save_group

    def segmentations(folder: Path) -> list[str]:
        extra = []
        for j, (seg, prob) in enumerate(zip(result.segmentations,
                                            result.probabilities_per_image)):
            io.write_image(seg, folder / str(j) / "segmentation.nii.gz")
            io.write_image(prob.float(), folder / str(j) / "probabilities.nii.gz")
            extra += [f"{j}/segmentation.nii.gz", f"{j}/probabilities.nii.gz"]
        return extra

    return save_group(result, outdir, force=force, inputs=inputs, protect=protect,
                      write_extra=segmentations)
