"""The MNI ICBM152 2009 template that the ``nilearn`` wheel ships, as itreg images.

nilearn bundles three files in ``nilearn/datasets/data/`` (197 x 233 x 189 voxels, 1 mm,
uint8): the brain-extracted T1 and the grey- and white-matter probability maps. No brain mask
and no CSF map ship, so :func:`load_mni` builds them as nilearn's own
``load_mni152_brain_mask`` does: mask = T1 > 0.2 x max, and CSF = clip(mask - GM - WM, 0, 1).

The files are located with :func:`importlib.util.find_spec`, which imports nothing from nilearn
(its dataset fetchers are heavy and may touch the network); nothing is downloaded or cached.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from itreg.engine.pyramid import smooth_image
from itreg.errors import ConfigError, ImageReadError
from itreg.image import Image
from itreg.io import read_image

#: File names of the template maps inside ``nilearn/datasets/data/``.
MNI_FILES = {
    "t1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "gm": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "wm": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}

#: Brain-mask threshold as a fraction of the T1 maximum (nilearn's default).
MASK_THRESHOLD = 0.2

_INSTALL_HINT = "install the data extra: pip install 'itreg[data]' (nilearn)"


def mni_template_paths() -> dict[str, Path]:
    """Paths of the T1, GM and WM template files shipped with nilearn.

    Returns:
        ``{"t1": Path, "gm": Path, "wm": Path}``.

    Raises:
        ImageReadError: if nilearn is not installed, or its wheel lacks one of the files.
    """
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ImageReadError(f"the MNI template needs nilearn, which is not installed; {_INSTALL_HINT}")
    for location in spec.submodule_search_locations:
        folder = Path(location) / "datasets" / "data"
        paths = {name: folder / fname for name, fname in MNI_FILES.items()}
        if all(p.is_file() for p in paths.values()):
            return paths
    folders = ", ".join(str(Path(p) / "datasets" / "data") for p in spec.submodule_search_locations)
    missing = ", ".join(MNI_FILES.values())
    raise ImageReadError(
        f"nilearn is installed but its template files ({missing}) are not in {folders}; "
        f"reinstall it: {_INSTALL_HINT}"
    )


def _scaled(image: Image, device) -> Image:
    """float32 copy on `device` divided by its maximum (so the maximum is 1)."""
    data = image.data.to(device=device, dtype=torch.float32)
    peak = float(data.max())
    if peak <= 0:
        raise ImageReadError("an MNI template map is all zero; reinstall nilearn")
    return Image(data / peak, image.grid, is_label=False)


def load_mni(spacing_mm: float | None = None, device: torch.device | str | None = None) -> dict[str, Image]:
    """Load the MNI ICBM152 2009 template with derived tissue maps.

    Args:
        spacing_mm: isotropic output spacing in mm. ``None`` (or the template's 1 mm) keeps the
            template grid. A coarser spacing smooths every map with a Gaussian of
            sigma = spacing / 2 mm per axis (decimating to about that spacing during the
            pass) and resamples it linearly onto ``grid.with_spacing(spacing_mm)`` (same
            centre and field of view); the mask is then the smoothed, resampled mask
            fraction >= 0.5. A finer spacing interpolates without smoothing.
        device: device of the returned tensors (default CPU).

    Returns:
        A dict of images on one grid (LPS world, as SimpleITK reads the file):

        * ``"t1"``: the brain-extracted T1, float32 in [0, 1] (maximum 1 on the 1 mm grid).
        * ``"gm"``, ``"wm"``: grey/white-matter probabilities, float32 in [0, 1] (the uint8
          maps divided by their maximum).
        * ``"csf"``: ``clip(mask - gm - wm, 0, 1)``, float32.
        * ``"mask"``: the brain mask, a uint8 label image (1 inside), T1 > 0.2 x max.

        GM, WM and CSF sum to at most 1 inside the mask; CSF is 0 outside it.

    Raises:
        ImageReadError: if nilearn or its template files are missing.
        ConfigError: for a spacing that is not positive and finite.
    """
    if spacing_mm is not None:
        spacing_mm = float(spacing_mm)
        if not (spacing_mm > 0 and spacing_mm < float("inf")):
            raise ConfigError(f"spacing_mm must be positive and finite, got {spacing_mm}")
    paths = mni_template_paths()
    t1, gm, wm = (_scaled(read_image(paths[k], dtype=torch.float32, is_label=False), device)
                  for k in ("t1", "gm", "wm"))
    for name, img in (("gm", gm), ("wm", wm)):
        if not img.grid.same_as(t1.grid):
            raise ImageReadError(f"the MNI {name} map {paths[name]} is not on the T1 grid")
    mask = (t1.data > MASK_THRESHOLD).to(torch.float32)
    csf = (mask - gm.data - wm.data).clamp(0.0, 1.0)
    grid = t1.grid
    if spacing_mm is None or all(abs(s - spacing_mm) < 1e-9 for s in grid.spacing):
        maps = {"t1": t1.data, "gm": gm.data, "wm": wm.data, "csf": csf}
    else:
        from itreg.warp import resample

        stack = Image(torch.cat([t1.data, gm.data, wm.data, csf, mask]), grid, is_label=False)
        sigma = [0.5 * spacing_mm if spacing_mm > s else 0.0 for s in grid.spacing]
        # Decimate while smoothing (to about the output spacing, never coarser), then
        # interpolate the decimated maps onto the output grid.
        stride = [max(int(spacing_mm / s + 1e-6), 1) for s in grid.spacing]
        stack = smooth_image(stack, sigma, stride)
        grid = grid.with_spacing(spacing_mm)
        out = resample(stack, None, grid, mode="linear").data.clamp(0.0, 1.0)
        maps = {"t1": out[0:1], "gm": out[1:2], "wm": out[2:3], "csf": out[3:4]}
        mask = (out[4:5] >= 0.5).to(torch.float32)
        maps["csf"] = maps["csf"] * mask
    result = {name: Image(data.contiguous(), grid, is_label=False) for name, data in maps.items()}
    result["mask"] = Image(mask.to(torch.uint8), grid, is_label=True)
    return result
