"""Synthetic MR contrasts from tissue probability maps, with seeded noise and bias field.

A contrast is a weighted sum of the CSF, GM and WM probabilities (a partial-volume model):
``s(x) = w_csf p_csf(x) + w_gm p_gm(x) + w_wm p_wm(x)``. The weights are in :data:`CONTRASTS`:

* ``"t2"``: CSF 0.84, GM 0.58, WM 0.37, the anchor benchmark's T2-like image
  (``notes/anchors.md``): CSF bright, WM dark.
* ``"pd"``: CSF 0.84, GM 0.72, WM 0.65: BrainWeb's relative proton densities (CSF 1.00,
  GM 0.86, WM 0.77; Kwan et al. 1999), scaled so that CSF has the T2 image's brightness.
  CSF and GM are bright, GM/WM contrast is low, as in a PD-weighted scan.
* ``"t1"``: the real template T1 (``tissues["t1"]``), not a weighted sum.

Then, in this order, a smooth multiplicative bias field and Rician noise (:func:`rician_noise`)
are applied. The field is either :func:`bias_field` (a quadratic polynomial scaled to a
``(lo, hi)`` range, the default of the pair and group phantoms) or, given an amplitude ``a``,
:func:`random_bias_field`, a richer smooth field spanning ``1 - a`` to ``1 + a`` (the MR bias
field variant of the benchmark, ``itreg phantom --bias 0.25``). Every random draw comes from a
seeded ``torch.Generator``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch
from torch import Tensor

from itreg.errors import ConfigError, MaskError, unknown_name
from itreg.grid import Grid
from itreg.image import Image
from itreg.phantoms._geometry import bounding_corners

#: Tissue weights of the weighted-sum contrasts (see the module docstring).
CONTRASTS: dict[str, dict[str, float]] = {
    "t2": {"csf": 0.84, "gm": 0.58, "wm": 0.37},
    "pd": {"csf": 0.84, "gm": 0.72, "wm": 0.65},
}

#: Contrast names :func:`synthesize` accepts.
CONTRAST_NAMES = ("t1", "t2", "pd")

#: Label values of :func:`labels`.
LABELS = {"background": 0, "csf": 1, "gm": 2, "wm": 3}

#: Total degree of the bias-field polynomial.
BIAS_DEGREE = 2

#: Cosine components of :func:`random_bias_field`.
BIAS_COMPONENTS = 6
#: Their wavelength range in mm (about the size of a brain to twice it).
BIAS_WAVELENGTHS_MM = (120.0, 300.0)


def _generator(seed: int) -> torch.Generator:
    """A CPU generator seeded with `seed` (draws are then moved to the target device)."""
    return torch.Generator().manual_seed(int(seed))


def _bias_region(grid, mask, device) -> torch.Tensor:
    """Where a bias field is normalised: the mask on `grid` (nonzero inside), else everywhere.

    Raises:
        MaskError: for an empty mask or one of another shape.
    """
    if mask is None:
        return torch.ones(grid.shape, dtype=torch.bool, device=device)
    if mask.numel() != grid.numel:
        raise MaskError(f"bias mask of shape {tuple(mask.shape)} is not on grid {grid.shape}")
    inside = mask.reshape(grid.shape).to(device) != 0
    if not bool(inside.any()):
        raise MaskError("the bias-field mask is empty")
    return inside

def bias_field(
    grid: Grid,
    mask: Tensor | None = None,
    value_range: tuple[float, float] = (0.80, 1.17),
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """A smooth random multiplicative field: a polynomial of world position.

    The field is a polynomial of total degree 2 in the world coordinates normalised to
    [-1, 1] over the world bounding box of `mask`'s index bounding box (the brain), with standard-normal coefficients
    drawn from ``seed``, then mapped linearly so that its minimum and maximum over the mask
    are exactly ``value_range``. The same seed gives the same physical field at any spacing
    of the same anatomy. Outside the mask the polynomial continues (values may leave the
    range there; it is clamped to stay positive).

    Args:
        grid: the grid to evaluate the field on.
        mask: ``(*grid.shape)`` or ``(1, *grid.shape)`` region the range refers to (nonzero =
            inside); ``None`` uses the whole grid.
        value_range: ``(lo, hi)`` with ``0 < lo <= hi``.
        seed: seed of the coefficients.
        dtype: dtype of the result.
        device: device of the result.

    Returns:
        The field, a tensor ``(1, *grid.shape)``.

    Raises:
        ConfigError: for an invalid range.
        MaskError: for an empty mask or one of another shape.
    """
    lo, hi = (float(v) for v in value_range)
    if not (0.0 < lo <= hi < float("inf")):
        raise ConfigError(f"bias range must satisfy 0 < lo <= hi, got {value_range}")
    # float32 is ample for a field normalised to [-1, 1] (and halves the memory traffic).
    points = grid.points(dtype=torch.float32, device=device)  # (*shape, D)
    inside = _bias_region(grid, mask, points.device)
    corners = bounding_corners(grid, inside, dtype=torch.float32)
    low, high = corners.min(dim=0).values, corners.max(dim=0).values
    half = ((high - low) / 2).clamp_min(1e-6)
    u = (points - (low + high) / 2) / half  # [-1, 1] over the mask's bounding box
    d = grid.ndim
    exponents = [e for e in itertools.product(range(BIAS_DEGREE + 1), repeat=d)
                 if 0 < sum(e) <= BIAS_DEGREE]
    coefs = torch.randn(len(exponents), generator=_generator(seed), dtype=torch.float64)
    powers = [[None] + [u[..., a] ** e for e in range(1, BIAS_DEGREE + 1)] for a in range(d)]
    field = torch.zeros(grid.shape, dtype=torch.float32, device=points.device)
    for c, exps in zip(coefs.tolist(), exponents):
        factors = [powers[a][e] for a, e in enumerate(exps) if e]
        term = factors[0] if len(factors) == 1 else torch.stack(factors).prod(dim=0)
        field.add_(term, alpha=c)
    fmin, fmax = field[inside].min(), field[inside].max()
    if float(fmax - fmin) <= 0 or lo == hi:
        out = torch.full_like(field, lo)
    else:
        out = lo + (field - fmin) * ((hi - lo) / (fmax - fmin))
    return out.clamp_min(1e-3 * lo).unsqueeze(0).to(dtype)


def random_bias_field(
    grid: Grid,
    mask: Tensor | None = None,
    amplitude: float = 0.25,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device=None,
) -> Tensor:
    """A smooth random multiplicative field of about ``1 +- amplitude`` over the mask.

    The field is a sum of :data:`BIAS_COMPONENTS` plane cosine waves in world coordinates,
    with directions uniform on the sphere (circle in 2D), wavelengths uniform in
    :data:`BIAS_WAVELENGTHS_MM` and uniform phases, all drawn from ``seed``; it is then mapped
    linearly so that its minimum and maximum over the mask are exactly ``1 - amplitude`` and
    ``1 + amplitude``. Unlike :func:`bias_field`'s quadratic it has several bright and dark
    regions across a brain, as receive-coil fields do, and it is a function of world position:
    the same seed gives the same physical field at any spacing. Outside the mask the field
    continues (clamped to stay positive).

    Args:
        grid: the grid to evaluate the field on.
        mask: ``(*grid.shape)`` or ``(1, *grid.shape)`` region the range refers to (nonzero =
            inside); ``None`` uses the whole grid.
        amplitude: half the span of the field, ``0 <= amplitude < 1`` (0.25: 0.75 to 1.25).
        seed: seed of the waves.
        dtype: dtype of the result.
        device: device of the result.

    Returns:
        The field, a tensor ``(1, *grid.shape)``.

    Raises:
        ConfigError: for an amplitude outside ``[0, 1)``.
        MaskError: for an empty mask or one of another shape.
    """
    try:
        a = float(amplitude)
    except (TypeError, ValueError):
        raise ConfigError(f"bias amplitude must be a number in [0, 1), got {amplitude!r}") from None
    if not (0.0 <= a < 1.0):
        raise ConfigError(f"bias amplitude must be in [0, 1), got {amplitude!r}")
    points = grid.points(dtype=torch.float64, device=device)  # (*shape, D)
    inside = _bias_region(grid, mask, points.device)
    gen = _generator(seed)
    d = grid.ndim
    k = BIAS_COMPONENTS
    directions = torch.randn(k, d, generator=gen, dtype=torch.float64)
    directions = directions / directions.norm(dim=1, keepdim=True).clamp_min(1e-12)
    lo_w, hi_w = BIAS_WAVELENGTHS_MM
    wavelengths = lo_w + (hi_w - lo_w) * torch.rand(k, generator=gen, dtype=torch.float64)
    phases = 2 * torch.pi * torch.rand(k, generator=gen, dtype=torch.float64)
    freq = (directions / wavelengths[:, None]).to(points.device)
    field = torch.cos(2 * torch.pi * (points @ freq.T) + phases.to(points.device)).sum(-1)
    fmin, fmax = field[inside].min(), field[inside].max()
    if float(fmax - fmin) <= 0 or a == 0.0:
        out = torch.ones_like(field)
    else:
        out = (1.0 - a) + (field - fmin) * (2.0 * a / (fmax - fmin))
    return out.clamp_min(1e-3).unsqueeze(0).to(dtype)


def rician_noise(image: Image, sigma: float, seed: int = 0) -> Image:
    """Rician noise: ``sqrt((s + n1)^2 + n2^2)`` with ``n1, n2 ~ N(0, sigma^2)`` i.i.d.

    This is the magnitude of a complex signal with Gaussian noise in both channels, as in MR
    magnitude images; the background (s = 0) becomes Rayleigh-distributed.

    Args:
        image: a floating-point image.
        sigma: noise standard deviation (>= 0; 0 returns the image unchanged).
        seed: seed of the noise (a ``torch.Generator`` on the image's device).

    Returns:
        A new image on the same grid, same dtype and device.

    Raises:
        ConfigError: for a negative sigma or a label image.
    """
    if image.is_label or not image.data.is_floating_point():
        raise ConfigError("rician_noise needs a floating-point intensity image, not labels")
    sigma = float(sigma)
    if not (sigma >= 0 and sigma < float("inf")):
        raise ConfigError(f"noise sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image.with_data(image.data.clone(), is_label=False)
    s = image.data
    gen = torch.Generator(device=s.device).manual_seed(int(seed))
    n = torch.randn((2, *s.shape), generator=gen, dtype=s.dtype, device=s.device) * sigma
    return image.with_data(torch.sqrt((s + n[0]) ** 2 + n[1] ** 2), is_label=False)


def _tissue(tissues: Mapping[str, Image], name: str) -> Image:
    if name not in tissues:
        raise ConfigError(f"tissue map {name!r} missing; have {sorted(tissues)} (see load_mni)")
    return tissues[name]


def synthesize(
    tissues: Mapping[str, Image],
    contrast: str = "t2",
    noise_sigma: float = 0.02,
    bias: tuple[float, float] | float | None = (0.80, 1.17),
    seed: int = 0,
) -> Image:
    """Synthesise an MR-like image from tissue maps.

    Args:
        tissues: the dict of :func:`itreg.phantoms.load_mni` (``"csf"``, ``"gm"``, ``"wm"``,
            ``"mask"``, and ``"t1"`` for the T1 contrast), all on one grid.
        contrast: ``"t1"`` (the real T1), ``"t2"`` or ``"pd"`` (weighted sums, see
            :data:`CONTRASTS`).
        noise_sigma: Rician noise sigma (intensities are in [0, 1]); 0 for none.
        bias: ``(lo, hi)``: range of the quadratic bias field (:func:`bias_field`) over the
            brain mask; a number ``a``: amplitude of the random field of about ``1 +- a``
            (:func:`random_bias_field`); ``None``: no field.
        seed: seed from which the bias field's and the noise's seeds are drawn.

    Returns:
        A float32 intensity image on the tissues' grid and device.

    Raises:
        ConfigError: for an unknown contrast, a missing map or invalid noise/bias settings.
    """
    if contrast not in CONTRAST_NAMES:
        raise unknown_name("contrast", contrast, CONTRAST_NAMES)
    if contrast == "t1":
        base = _tissue(tissues, "t1")
        signal = base.data.to(torch.float32)
    else:
        base = _tissue(tissues, "csf")
        signal = torch.zeros_like(base.data, dtype=torch.float32)
        for name, weight in CONTRASTS[contrast].items():
            tissue = _tissue(tissues, name)
            if not tissue.grid.same_as(base.grid):
                raise ConfigError(f"tissue map {name!r} is on another grid than 'csf'")
            signal = signal + weight * tissue.data.to(torch.float32)
    # Two independent sub-seeds, for the bias field and for the noise, drawn from `seed`.
    bias_seed, noise_seed = torch.randint(0, 2**62, (2,), generator=_generator(seed)).tolist()
    if bias is not None:
        mask = tissues["mask"].data if "mask" in tissues else (signal > 0)
        if isinstance(bias, (int, float)) and not isinstance(bias, bool):
            field = random_bias_field(base.grid, mask, bias, seed=bias_seed,
                                      device=signal.device)
        else:
            field = bias_field(base.grid, mask, bias, seed=bias_seed, device=signal.device)
        signal = signal * field
    image = Image(signal, base.grid, is_label=False)
    return rician_noise(image, noise_sigma, seed=noise_seed)


def labels(tissues: Mapping[str, Image]) -> Image:
    """Tissue label map: 0 background, 1 CSF, 2 GM, 3 WM (:data:`LABELS`).

    Inside the brain mask each voxel gets the tissue of largest probability (ties go to the
    lower label); outside it, 0.

    Args:
        tissues: the dict of :func:`itreg.phantoms.load_mni`.

    Returns:
        A uint8 label image on the tissues' grid and device.
    """
    # Element-wise running maximum: much faster than argmax over a leading axis on CPU.
    best = _tissue(tissues, "csf").data
    lab = torch.full_like(best, LABELS["csf"], dtype=torch.uint8)
    for name in ("gm", "wm"):
        prob = _tissue(tissues, name).data
        wins = prob > best
        lab[wins] = LABELS[name]
        best = torch.maximum(best, prob)
    lab[_tissue(tissues, "mask").data == 0] = LABELS["background"]
    return Image(lab, tissues["csf"].grid, is_label=True)
