"""Sources of training pairs for registration networks: files on disk, or phantoms on the fly.

A pair source is any object with ``len(source)``, ``source[i] -> PairSample`` and a ``grid``
attribute: the common grid every sample lies on (so samples stack into batches). Two are built
in:

- :class:`FolderPairs`: images from a CSV (columns ``fixed``, ``moving`` and optionally
  ``fixed_labels``, ``moving_labels``; relative paths are relative to the CSV's folder) or a
  folder holding ``fixed/`` and ``moving/`` (and optionally ``fixed_labels/``,
  ``moving_labels/``) with matching file names. Every image is resampled onto one common grid
  (the first fixed image's, optionally at another spacing) by the identity in world space:
  intensities linearly (Gaussian anti-aliasing of half the new spacing when it is coarser),
  labels with one-hot linear interpolation and argmax.
- :class:`PhantomPairs`: pairs made on the fly from the MNI template following paper 003's
  protocol: fixed = the template T1, moving = a synthetic T2-like (or PD-like) contrast of the
  anatomy deformed by a random cubic B-spline FFD (20 mm control spacing, N(0, 6^2 mm^2) per
  coefficient component; :func:`itreg.phantoms.pair_from_tissues` with ``kind="ffd"``), with
  CSF/GM/WM label maps of both and the true transform. 2D pairs use an axial slice. Pair ``i``
  is drawn with seed ``seed + i``, so a source is deterministic and two sources with distant
  seeds (say 0 and 100000) are disjoint training and test sets.

Both cache what they build (the template is loaded once per source; samples are kept when
``cache=True``). :class:`PhantomPairs` can also keep its pairs on disk (``cache_dir``): one
``.pt`` file per seed holding the moving image and labels, so separate processes (training and
evaluation runs of one benchmark, say) build each 3D pair once.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

from itreg.errors import ConfigError, GeometryError, ImageReadError
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms import Transform
from itreg.warp import resample

logger = logging.getLogger(__name__)

__all__ = ["FolderPairs", "PairSample", "PairSource", "PhantomPairs", "check_source"]

_COLUMNS = ("fixed", "moving", "fixed_labels", "moving_labels")


@dataclass(frozen=True, eq=False)
class PairSample:
    """One training pair on its source's common grid.

    Attributes:
        fixed: fixed image (float32) on the common grid.
        moving: moving image (float32) resampled onto the same grid.
        fixed_labels: integer label map of the fixed image on the grid, or None.
        moving_labels: integer label map of the moving image on the grid, or None.
        truth: the true fixed -> moving transform when known (phantoms), else None.
        name: a description (file names, or the phantom seed).
    """

    fixed: Image
    moving: Image
    fixed_labels: Image | None = None
    moving_labels: Image | None = None
    truth: Transform | None = None
    name: str = ""

    @property
    def has_labels(self) -> bool:
        return self.fixed_labels is not None and self.moving_labels is not None


@runtime_checkable
class PairSource(Protocol):
    """What training needs from a source of pairs."""

    grid: Grid

    def __len__(self) -> int:
        """Number of pairs."""

    def __getitem__(self, index: int) -> PairSample:
        """Pair ``index`` (``0 <= index < len(self)``)."""


def check_source(source: object, name: str = "source") -> None:
    """Raise ConfigError unless `source` is a non-empty pair source."""
    if not isinstance(source, PairSource):
        raise ConfigError(f"the {name} must be a pair source (len, [i] -> PairSample, .grid), "
                          f"got {type(source).__name__}")
    if len(source) < 1:
        raise ConfigError(f"the {name} holds no pairs")


def _index(i: int, n: int) -> int:
    if isinstance(i, bool) or not isinstance(i, int):
        raise TypeError(f"pair indices are integers, got {type(i).__name__}")
    if i < 0:
        i += n
    if not 0 <= i < n:
        raise IndexError(f"pair index {i} out of range for {n} pairs")
    return i


# ---------------------------------------------------------------------------------- folders
class FolderPairs:
    """Pairs of image files, resampled onto one common grid.

    Args:
        location: a CSV file (header with at least ``fixed`` and ``moving``; optional
            ``fixed_labels`` and ``moving_labels``, empty cells allowed only if the whole
            column is empty) or a folder with ``fixed/`` and ``moving/`` subfolders holding
            files of the same names (optional ``fixed_labels/`` and ``moving_labels/``).
        grid: the common grid; None takes the first fixed image's grid.
        spacing_mm: resample the common grid to this isotropic spacing (same extent).
        cache: keep loaded samples in memory.

    Raises:
        ImageReadError: a missing CSV/folder or image file (named).
        ConfigError: a CSV without the needed columns, or no pairs.
        GeometryError: images of different dimensions.
    """

    def __init__(self, location: str | os.PathLike, grid: Grid | None = None,
                 spacing_mm: float | None = None, cache: bool = True) -> None:
        self.location = Path(location)
        self.rows = self._rows(self.location)
        if not self.rows:
            raise ConfigError(f"no pairs found in {str(self.location)!r}")
        self.has_labels = all(r.get("fixed_labels") and r.get("moving_labels") for r in self.rows)
        if grid is None:
            from itreg.io import read_header

            grid = read_header(self.rows[0]["fixed"]).grid
        if spacing_mm is not None:
            if not float(spacing_mm) > 0:
                raise ConfigError(f"spacing_mm must be > 0, got {spacing_mm}")
            grid = grid.with_spacing(float(spacing_mm))
        self.grid = grid
        self.cache = bool(cache)
        self._samples: dict[int, PairSample] = {}

    @staticmethod
    def _rows(location: Path) -> list[dict[str, Path | None]]:
        if location.is_file():
            with open(location, newline="") as fh:
                reader = csv.DictReader(fh)
                fields = [f.strip() for f in (reader.fieldnames or [])]
                missing = [c for c in ("fixed", "moving") if c not in fields]
                if missing:
                    raise ConfigError(f"CSV {str(location)!r} lacks the column(s) "
                                      f"{', '.join(missing)}; its header is {fields}")
                rows = []
                for raw in reader:
                    row = {k.strip(): (v or "").strip() for k, v in raw.items() if k}
                    rows.append({c: (location.parent / row[c]) if row.get(c) else None
                                 for c in _COLUMNS})
            for i, r in enumerate(rows):
                if r["fixed"] is None or r["moving"] is None:
                    raise ConfigError(f"CSV {str(location)!r} row {i + 2}: fixed and moving "
                                      "are required")
            return rows
        if location.is_dir():
            fixed_dir, moving_dir = location / "fixed", location / "moving"
            if not fixed_dir.is_dir() or not moving_dir.is_dir():
                raise ImageReadError(f"folder {str(location)!r} must hold 'fixed/' and "
                                     "'moving/' subfolders (or give a CSV)")
            rows = []
            for f in sorted(p for p in fixed_dir.iterdir() if p.is_file()):
                row: dict[str, Path | None] = {"fixed": f, "moving": moving_dir / f.name}
                for c in ("fixed_labels", "moving_labels"):
                    cand = location / c / f.name
                    row[c] = cand if cand.is_file() else None
                rows.append(row)
            return rows
        raise ImageReadError(f"pair list {str(location)!r} does not exist (give a CSV file or a "
                             "folder with fixed/ and moving/)")

    @staticmethod
    def _read(path: Path, label: bool = False) -> Image:
        from itreg.io import read_image

        if label:
            return read_image(path, is_label=True)
        return read_image(path, dtype=torch.float32, is_label=False)

    def _on_grid(self, image: Image, label: bool, what: Path) -> Image:
        if image.ndim != self.grid.ndim:
            raise GeometryError(f"{str(what)!r} is {image.ndim}D but the pairs' grid is "
                                f"{self.grid.ndim}D")
        if image.grid.same_as(self.grid):
            return image
        if label:
            return resample(image, None, self.grid, mode="label")
        src = image
        coarser = max(self.grid.spacing) > min(image.grid.spacing) * 1.01
        if coarser:
            from itreg.engine.pyramid import smooth_image

            src = smooth_image(image, 0.5 * max(self.grid.spacing))
        return resample(src, None, self.grid, mode="linear")

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> PairSample:
        i = _index(index, len(self))
        if i in self._samples:
            return self._samples[i]
        row = self.rows[i]
        imgs = {}
        for c in _COLUMNS:
            path = row[c]
            if path is None or (c.endswith("labels") and not self.has_labels):
                imgs[c] = None
                continue
            label = c.endswith("labels")
            imgs[c] = self._on_grid(self._read(path, label), label, path)
        sample = PairSample(imgs["fixed"], imgs["moving"], imgs["fixed_labels"],
                            imgs["moving_labels"], None,
                            f"{row['fixed'].name},{row['moving'].name}")
        if self.cache:
            self._samples[i] = sample
        return sample


# ---------------------------------------------------------------------------------- phantoms
class PhantomPairs:
    """Paper 003's phantom pairs, made on the fly (see the module docstring).

    Args:
        n: number of pairs.
        ndim: 2 (an axial slice) or 3.
        spacing_mm: isotropic spacing of the template (2 mm: the issue's 3D setting; 4 mm or
            2D for the small CPU setting).
        seed: pair ``i`` uses seed ``seed + i`` (FFD, bias field, noise).
        contrast: the moving contrast, ``"t2"`` (default), ``"pd"`` or ``"t1"``.
        fixed_contrast: the fixed image: ``"t1"`` (default, the template's real T1) or a
            noise-free, bias-free ``"t2"`` or ``"pd"`` synthesised from the template (paper
            003's PD-T2 and T2-T2 tasks).
        control_spacing_mm: FFD control-point spacing (paper 003: 20 mm).
        sigma_mm: FFD coefficient standard deviation (paper 003: 6 mm).
        noise_sigma: Rician noise of the moving image.
        bias: bias-field range of the moving image, or None.
        slice_index: the 2D slice (None: the middle one).
        cache: keep built pairs in memory (about 5 images per pair on the template grid).
        device: device of the images.
        template: the tissue maps of :func:`itreg.phantoms.load_mni` already loaded at
            `spacing_mm` (share one load between the training, validation and test sources);
            None loads them on first use.
        cache_dir: a folder keeping every built pair on disk (created if missing), one file
            ``phantom-<settings hash>-<seed>.pt`` per pair with the moving image and labels
            (the fixed image, its labels and the true transform are rebuilt from the
            template and the seed). A later source with the same settings loads the pair
            instead of building it again; files are written atomically, so processes may
            share the folder. None: no disk cache.

    Raises:
        ConfigError: invalid numbers or an unknown contrast.
    """

    def __init__(self, n: int, ndim: int = 2, spacing_mm: float = 2.0, seed: int = 0,
                 contrast: str = "t2", control_spacing_mm: float = 20.0, sigma_mm: float = 6.0,
                 fixed_contrast: str = "t1", noise_sigma: float = 0.02, bias: tuple[float, float] | None = (0.80, 1.17),
                 slice_index: int | None = None, cache: bool = True,
                 device: torch.device | str | None = None,
                 template: dict[str, Image] | None = None,
                 cache_dir: str | os.PathLike | None = None) -> None:
        from itreg.phantoms import CONTRAST_NAMES

        if isinstance(n, bool) or int(n) != n or int(n) < 1:
            raise ConfigError(f"n must be an integer >= 1, got {n!r}")
        if ndim not in (2, 3):
            raise ConfigError(f"ndim must be 2 or 3, got {ndim!r}")
        if not float(spacing_mm) > 0:
            raise ConfigError(f"spacing_mm must be > 0, got {spacing_mm}")
        for c in (contrast, fixed_contrast):
            if c not in CONTRAST_NAMES:
                raise ConfigError(f"unknown contrast {c!r}; valid: {', '.join(CONTRAST_NAMES)}")
        self.fixed_contrast = fixed_contrast
        self._fixed: Image | None = None
        self.n, self.ndim, self.spacing_mm = int(n), int(ndim), float(spacing_mm)
        self.seed, self.contrast = int(seed), contrast
        self.control_spacing_mm, self.sigma_mm = float(control_spacing_mm), float(sigma_mm)
        self.noise_sigma, self.bias = float(noise_sigma), bias
        self.slice_index, self.cache, self.device = slice_index, bool(cache), device
        self.has_labels = True
        self._template = template
        self._tissues: dict[str, Image] | None = None
        self._fixed_labels: Image | None = None
        self._samples: dict[int, PairSample] = {}
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)

    def config(self) -> dict:
        """The settings (JSON-able), for training logs (``fixed_contrast`` only where it is
        not the default T1, so the disk caches of T1 pairs keep their names)."""
        out = {"source": "phantom", "n": self.n, "ndim": self.ndim,
               "spacing_mm": self.spacing_mm, "seed": self.seed, "contrast": self.contrast,
               "control_spacing_mm": self.control_spacing_mm, "sigma_mm": self.sigma_mm,
               "noise_sigma": self.noise_sigma,
               "bias": list(self.bias) if self.bias is not None else None,
               "slice_index": self.slice_index}
        if self.fixed_contrast != "t1":
            out["fixed_contrast"] = self.fixed_contrast
        return out

    @property
    def fixed(self) -> Image:
        """The fixed image of every pair: the template in ``fixed_contrast``."""
        if self._fixed is None:
            if self.fixed_contrast == "t1":
                self._fixed = self.tissues["t1"]
            else:
                from itreg.phantoms import synthesize

                self._fixed = synthesize(self.tissues, self.fixed_contrast, noise_sigma=0.0,
                                         bias=None)
        return self._fixed

    @property
    def tissues(self) -> dict[str, Image]:
        """The template's tissue maps (loaded once per source)."""
        if self._tissues is None:
            from itreg.phantoms import axial_slices, load_mni

            maps = self._template
            if maps is None:
                maps = load_mni(self.spacing_mm, device=self.device)
            elif any(abs(sp - self.spacing_mm) > 1e-6 for sp in maps["t1"].grid.spacing):
                raise ConfigError(f"the template given is at {maps['t1'].grid.spacing} mm, not "
                                  f"{self.spacing_mm} mm")
            if maps["t1"].ndim != 3:
                raise GeometryError("the phantom template must be the 3D maps of load_mni")
            self._tissues = axial_slices(maps, self.slice_index) if self.ndim == 2 else maps
        return self._tissues

    @property
    def grid(self) -> Grid:
        """The fixed (template) grid every pair lies on."""
        return self.tissues["t1"].grid

    def __len__(self) -> int:
        return self.n

    def cache_path(self, index: int) -> Path | None:
        """The disk-cache file of pair `index` (None without ``cache_dir``)."""
        if self.cache_dir is None:
            return None
        i = _index(index, self.n)
        settings = {k: v for k, v in self.config().items() if k not in ("n", "seed")}
        digest = hashlib.sha1(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / f"phantom-{digest}-{self.seed + i}.pt"

    def _load(self, path: Path, seed: int) -> PairSample | None:
        from itreg.phantoms import labels, random_ffd

        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            grid = self.grid
            moving, moving_labels = saved["moving"], saved["moving_labels"]
            if tuple(moving.shape[1:]) != tuple(grid.shape) or saved["seed"] != seed:
                raise ValueError("another grid or seed")
        except (OSError, RuntimeError, KeyError, TypeError, ValueError, EOFError,
                pickle.UnpicklingError) as exc:
            logger.warning("phantom cache %s unusable (%s); rebuilding the pair", path, exc)
            return None
        fixed = self.fixed
        if self._fixed_labels is None:
            self._fixed_labels = labels(self.tissues)
        truth = random_ffd(grid, self.control_spacing_mm, self.sigma_mm, seed=seed,
                           dtype=torch.float32, device=fixed.device)
        return PairSample(fixed, Image(moving.to(fixed.device), grid, is_label=False),
                          self._fixed_labels,
                          Image(moving_labels.to(fixed.device), grid, is_label=True), truth,
                          f"phantom seed {seed}")

    def __getitem__(self, index: int) -> PairSample:
        i = _index(index, self.n)
        if i in self._samples:
            return self._samples[i]
        seed = self.seed + i
        path = self.cache_path(i)
        sample = self._load(path, seed) if path is not None and path.is_file() else None
        if sample is None:
            sample = self._build(seed)
            if path is not None:
                tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
                torch.save({"seed": seed, "moving": sample.moving.data.cpu(),
                            "moving_labels": sample.moving_labels.data.cpu()}, tmp)
                os.replace(tmp, path)
        if self.cache:
            self._samples[i] = sample
        return sample

    def _build(self, seed: int) -> PairSample:
        from itreg.phantoms import pair_from_tissues

        pair = pair_from_tissues(self.tissues, self.contrast, "ffd", seed,
                                 noise_sigma=self.noise_sigma, bias=self.bias,
                                 control_spacing_mm=self.control_spacing_mm,
                                 sigma_mm=self.sigma_mm)
        grid = self.grid
        # The moving grid is the fixed grid padded by whole voxels: the identity resampling
        # below only crops (voxel centres coincide).
        moving = resample(pair.moving, None, grid, mode="linear")
        moving_labels = resample(pair.moving_labels, None, grid, mode="nearest")
        return PairSample(self.fixed, moving, pair.fixed_labels, moving_labels,
                          pair.true_transform, f"phantom seed {seed}")


def stack_samples(samples: Sequence[PairSample], device=None) -> dict[str, torch.Tensor | None]:
    """Stack samples on one grid into batch tensors ``(B, C, *S)`` (labels ``(B, 1, *S)``)."""
    grid = samples[0].fixed.grid
    for s in samples:
        if not s.fixed.grid.same_as(grid) or not s.moving.grid.same_as(grid):
            raise GeometryError("the pairs of a batch must share one grid")
    out: dict[str, torch.Tensor | None] = {
        "fixed": torch.stack([s.fixed.data.float() for s in samples]).to(device),
        "moving": torch.stack([s.moving.data.float() for s in samples]).to(device),
    }
    labelled = all(s.has_labels for s in samples)
    for key in ("fixed_labels", "moving_labels"):
        out[key] = (torch.stack([getattr(s, key).data.long() for s in samples]).to(device)
                    if labelled else None)
    return out
