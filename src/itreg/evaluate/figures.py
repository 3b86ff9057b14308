"""PNG figures: checkerboards and overlays of a fixed image with moving images."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from itreg.errors import GeometryError
from itreg.image import Image


def _middle_slice(image: Image) -> np.ndarray:
    data = image.data[0].detach().float().cpu().numpy()
    if data.ndim == 3:
        data = data[data.shape[0] // 2]  # axial slice (constant z)
    return data


def _normalise(a: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(a, [0.5, 99.5])
    return np.clip((a - lo) / max(hi - lo, 1e-12), 0, 1)


def checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    """Alternate square tiles of `a` and `b` (2D arrays of the same shape)."""
    yy, xx = np.indices(a.shape)
    ty = max(a.shape[0] // tiles, 1)
    tx = max(a.shape[1] // tiles, 1)
    return np.where(((yy // ty) + (xx // tx)) % 2 == 0, a, b)


def save_comparison_figure(
    fixed: Image, before: Image, after: Image, path: str | Path, title: str = ""
) -> Path:
    """Save checkerboards and colour overlays of `fixed` with `before` and `after`.

    All three images must lie on the same grid (resample the moving image onto the fixed grid
    first). The middle axial slice is shown for 3D images.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not (fixed.grid.same_as(before.grid) and fixed.grid.same_as(after.grid)):
        raise GeometryError("comparison figure needs the three images on the fixed grid")
    f, b, a = (_normalise(_middle_slice(im)) for im in (fixed, before, after))
    fig, axes = plt.subplots(2, 2, figsize=(9, 9))
    for col, (moving, label) in enumerate([(b, "before"), (a, "after")]):
        axes[0, col].imshow(checkerboard(f, moving), cmap="gray", origin="lower")
        axes[0, col].set_title(f"checkerboard {label}")
        rgb = np.stack([f, moving, np.zeros_like(f)], axis=-1)
        axes[1, col].imshow(rgb, origin="lower")
        axes[1, col].set_title(f"overlay {label} (red fixed, green moving)")
    for ax in axes.ravel():
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
