"""Metric landscapes: a metric over a grid of rigid offsets of an aligned pair.

:func:`metric_landscape` moves the (aligned) moving image by every offset of a regular grid of
translations (mm) and/or rotations (degrees) about the fixed image's centre, evaluates the
metric's **loss** (lower = better aligned) on the fixed grid, and summarises the response:

- the **full width at half maximum** (FWHM) per axis: the response ``r = -loss`` is taken
  along the axis through the grid's best offset, rescaled so that its minimum over the whole
  grid is 0 and its peak 1, and the width of the contiguous interval around the peak where
  ``r >= 0.5`` is measured with linear interpolation at the crossings (in the axis's units). When
  the response stays above half maximum up to the end of the range the width is a lower bound
  (``censored``);
- the **number of local optima**: strict local minima of the loss on the grid (the ``3^n - 1``
  neighbourhood) up to a plateau tolerance ``tol = plateau_tol * (max(loss) - min(loss))``.
  Grid points are visited from the lowest loss up; from each point ``p`` not yet reached, the
  connected set of points with ``loss <= loss[p] + tol`` is flooded. ``p`` is an optimum when
  that set reaches no point flooded before (no lower region is connected to it below
  ``loss[p] + tol``). So a plateau of equal values counts once, and a dip shallower than
  ``tol`` does not count. Points on the edge of the grid are compared with the neighbours that
  exist (a minimum on the edge counts).

Trainable metrics (fresh neural critics, ``"mine"``, ``"kldiv"``): the estimate is a supremum
over the critic, so the critic is first fitted at the zero offset (``warmup_steps`` Adam steps)
and then, at every offset, re-fitted for ``fit_steps`` steps starting from those weights before
the estimate is averaged over ``repeats`` fresh shuffles. A pre-trained critic
(``"mine:critic.pt"``) is evaluated as it is. Random metrics are re-seeded at every offset so
the landscape does not depend on the evaluation order.

Example:
    >>> from itreg.evaluate.landscape import metric_landscape    # doctest: +SKIP
    >>> land = metric_landscape(fixed, moving, "mi", axes=("tx", "ty"), ranges=[(-20, 20, 1)])
    >>> land.optima, land.fwhm
"""

from __future__ import annotations

import copy
import csv
import itertools
import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from itreg.errors import ConfigError, GeometryError
from itreg.image import Image
from itreg.metrics.neural import critic_steps

logger = logging.getLogger(__name__)

__all__ = [
    "AXES",
    "Landscape",
    "count_local_optima",
    "fwhm",
    "metric_landscape",
    "parse_range",
    "save_landscape",
]

AXES = ("tx", "ty", "tz", "rx", "ry", "rz")
"""Offset axes: translations in mm along x, y, z and rotations in degrees about x, y, z (2D
images allow ``tx``, ``ty`` and ``rz``)."""


def parse_range(text: str) -> tuple[float, float, float]:
    """Parse ``"start:stop:step"`` (stop included when on the grid), e.g. ``"-20:20:1"``.

    Raises:
        ConfigError: not three numbers, ``step <= 0`` or ``stop < start``.
    """
    parts = str(text).split(":")
    try:
        start, stop, step = (float(p) for p in parts)
    except ValueError:
        raise ConfigError(f"a range is 'start:stop:step' (e.g. -20:20:1), got {text!r}") from None
    if not (step > 0 and stop >= start and all(map(math.isfinite, (start, stop, step)))):
        raise ConfigError(f"range {text!r} needs step > 0 and stop >= start")
    return start, stop, step


def _values(rng: tuple[float, float, float]) -> np.ndarray:
    start, stop, step = rng
    n = math.floor((stop - start) / step + 1e-9) + 1
    if n > 2001:
        raise ConfigError(f"range {rng} has {n} values; at most 2001 per axis")
    return start + step * np.arange(n, dtype=np.float64)


# ---------------------------------------------------------------------------------- summaries
def _neighbour_offsets(ndim: int) -> list[tuple[int, ...]]:
    return [d for d in itertools.product((-1, 0, 1), repeat=ndim) if any(d)]


def _check_plateau_tol(plateau_tol: float) -> None:
    if isinstance(plateau_tol, bool) or not isinstance(plateau_tol, (int, float)) or \
            not math.isfinite(plateau_tol) or not 0.0 <= plateau_tol <= 1.0:
        raise ConfigError(f"plateau_tol must be a number in [0, 1] (a fraction of the loss "
                          f"range), got {plateau_tol!r}")


def count_local_optima(loss: np.ndarray, plateau_tol: float = 1e-3) -> list[tuple[int, ...]]:
    """Local minima of ``loss`` on its grid, one index per optimum (see the module docstring).

    Args:
        loss: loss values on a 1D or 2D (or nD) grid; NaN entries are ignored.
        plateau_tol: plateau tolerance relative to the loss range.

    Returns:
        For each optimum, the grid index of its lowest point, sorted by loss (best first).

    Raises:
        ConfigError: `plateau_tol` is not a finite number in [0, 1].
    """
    _check_plateau_tol(plateau_tol)
    a = np.asarray(loss, dtype=np.float64)
    finite = np.isfinite(a)
    if not finite.any():
        return []
    span = float(np.nanmax(a) - np.nanmin(a))
    tol = plateau_tol * span
    shape = a.shape
    offs = _neighbour_offsets(a.ndim)

    def neighbours(idx):
        for d in offs:
            j = tuple(i + k for i, k in zip(idx, d))
            if all(0 <= x < s for x, s in zip(j, shape)) and finite[j]:
                yield j

    visited: set = set()
    optima = []
    for idx in sorted((i for i in np.ndindex(shape) if finite[i]), key=lambda i: a[i]):
        if idx in visited:
            continue
        level = a[idx] + tol
        stack, comp, lower = [idx], {idx}, False
        while stack:
            p = stack.pop()
            for j in neighbours(p):
                if j not in comp and a[j] <= level:
                    comp.add(j)
                    stack.append(j)
        lower = any(p in visited for p in comp)
        visited |= comp
        if not lower:
            optima.append(idx)
    return sorted(optima, key=lambda p: a[p])


def fwhm(offsets: np.ndarray, response: np.ndarray, peak: int, baseline: float | None = None,
         top: float | None = None) -> tuple[float, bool]:
    """Full width at half maximum of a 1D response around index ``peak``.

    Args:
        offsets: axis values ``(n,)`` (increasing).
        response: response values ``(n,)`` (higher = better aligned), NaNs allowed.
        peak: index of the peak.
        baseline: the response's floor (default: its minimum).
        top: the peak height (default: ``response[peak]``).

    Returns:
        ``(width, censored)``; ``censored`` is True when a side never drops below half maximum
        inside the range (the width is then a lower bound). A flat response gives ``(nan, True)``.
    """
    r = np.asarray(response, dtype=np.float64)
    x = np.asarray(offsets, dtype=np.float64)
    lo = np.nanmin(r) if baseline is None else baseline
    hi = r[peak] if top is None else top
    if not hi > lo:
        return math.nan, True
    half = lo + 0.5 * (hi - lo)
    censored = False

    def side(step: int) -> float:
        nonlocal censored
        i = peak
        while 0 <= i + step < len(r) and np.isfinite(r[i + step]) and r[i + step] >= half:
            i += step
        j = i + step
        if not (0 <= j < len(r)) or not np.isfinite(r[j]):
            censored = True
            return x[i]
        t = (r[i] - half) / (r[i] - r[j]) if r[i] != r[j] else 0.0
        return x[i] + t * (x[j] - x[i])

    return float(side(1) - side(-1)), censored


# ---------------------------------------------------------------------------------- landscape
@dataclass
class Landscape:
    """A metric landscape and its summary.

    Attributes:
        metric: the metric's name.
        quantity_name: the metric's quantity (for the plots).
        quantity_sign: ``quantity = quantity_sign * loss``.
        axes: the offset axes.
        offsets: per axis, the offsets (mm or degrees).
        loss: losses ``(n_1, ..., n_k)`` (lower = better aligned; NaN where no overlap).
        optima: grid indices of the local optima, best first.
        fwhm: per axis, the FWHM of the response through the best offset (axis units).
        fwhm_censored: per axis, whether the FWHM is only a lower bound.
        settings: how the landscape was computed.
        quantity: the metric's quantity at every offset (its ``quantity(loss)``, which need not
            be ``quantity_sign * loss``: DeepSim's is ``1 - loss``); None: ``quantity_sign *
            loss``.
    """

    metric: str
    quantity_name: str
    quantity_sign: float
    axes: tuple[str, ...]
    offsets: list[np.ndarray]
    loss: np.ndarray
    optima: list[tuple[int, ...]]
    fwhm: list[float]
    fwhm_censored: list[bool]
    settings: dict[str, Any] = field(default_factory=dict)
    quantity: np.ndarray | None = None

    @property
    def quantity_values(self) -> np.ndarray:
        """The metric quantity at every offset (for tables and plots)."""
        return self.quantity if self.quantity is not None else self.quantity_sign * self.loss

    @property
    def n_optima(self) -> int:
        """Number of local optima."""
        return len(self.optima)

    @property
    def best_offset(self) -> tuple[float, ...]:
        """The offset of the global optimum (axis units)."""
        idx = self.optima[0]
        return tuple(float(o[i]) for o, i in zip(self.offsets, idx))

    def summary(self) -> dict[str, Any]:
        """A JSON-serialisable summary."""
        return {
            "metric": self.metric, "quantity": self.quantity_name, "axes": list(self.axes),
            "units": ["deg" if a.startswith("r") else "mm" for a in self.axes],
            "n_optima": self.n_optima, "best_offset": list(self.best_offset) if self.optima else None,
            "optima_offsets": [[float(o[i]) for o, i in zip(self.offsets, idx)]
                               for idx in self.optima],
            "fwhm": [None if not math.isfinite(w) else w for w in self.fwhm],
            "fwhm_censored": list(self.fwhm_censored), "settings": self.settings,
        }


def _axis_params(axes: Sequence[str], ndim: int) -> list[tuple[str, int]]:
    allowed = ("tx", "ty", "rz") if ndim == 2 else AXES
    out = []
    for a in axes:
        if a not in allowed:
            raise ConfigError(f"unknown landscape axis {a!r} for {ndim}D images; valid axes are: "
                              f"{', '.join(allowed)}")
        if a.startswith("t"):
            out.append(("t", "xyz".index(a[1])))
        else:
            out.append(("r", 0 if ndim == 2 else "xyz".index(a[1])))
    if len(set(axes)) != len(axes):
        raise ConfigError(f"landscape axes repeat: {', '.join(axes)}")
    return out


def _fit_critic(metric, f: Tensor, m: Tensor, mask: Tensor, ranges, steps: int, lr: float):
    """`steps` Adam steps of the critic at one alignment (stops at a non-finite value)."""
    opt = torch.optim.Adam(metric.critic_parameters(), lr=lr)
    critic_steps(metric, opt, lambda: metric(f, m, mask=mask, fixed_range=ranges[0],
                                             moving_range=ranges[1]), steps)


def metric_landscape(
    fixed: Image,
    moving: Image,
    metric: str | Any,
    axes: Sequence[str] = ("tx", "ty"),
    ranges: Sequence[tuple[float, float, float]] = ((-20.0, 20.0, 1.0),),
    fixed_mask: Tensor | None = None,
    center: Sequence[float] | None = None,
    plateau_tol: float = 1e-3,
    warmup_steps: int = 300,
    fit_steps: int = 30,
    repeats: int = 4,
    seed: int = 0,
    progress: Callable[[int, int], None] | None = None,
    **metric_kwargs: Any,
) -> Landscape:
    """Evaluate a metric over a grid of rigid offsets of an aligned pair.

    The offset ``(t, r)`` warps the moving image by the rigid map ``x -> R (x - c) + c + t``
    (``c`` = ``center``, default the fixed grid's centre), sampled on the fixed grid; voxels that
    map outside the moving image are masked out.

    Args:
        fixed: the fixed image.
        moving: the moving image, aligned with ``fixed`` (same world space).
        metric: a registered metric name (``"mi"``, ``"lncc"``, ``"mine"``, ``"ditr:m.pt"``...)
            or a metric module.
        axes: 1 or 2 (or more) of :data:`AXES`; translations in mm, rotations in degrees.
        ranges: ``(start, stop, step)`` per axis, or one range for all axes.
        fixed_mask: optional mask on the fixed grid (bool tensor ``S`` or mask Image).
        center: rotation centre (world mm); default the fixed grid's centre.
        plateau_tol: relative plateau tolerance of the optimum count.
        warmup_steps: critic steps at the zero offset (trainable metrics only).
        fit_steps: critic steps at every offset (trainable metrics only).
        repeats: evaluations averaged per offset for random metrics (fresh shuffles).
        seed: seed of random metrics at every offset.
        progress: optional ``callback(done, total)``.
        **metric_kwargs: settings when ``metric`` is a name.

    Returns:
        The :class:`Landscape`.

    Raises:
        ConfigError: bad axes or ranges, unknown metric.
        GeometryError: 2D/3D mismatch.
    """
    _check_plateau_tol(plateau_tol)
    from itreg.metrics import get_metric
    from itreg.transforms import Rigid
    from itreg.warp import resample_with_mask

    if fixed.grid.ndim != moving.grid.ndim:
        raise GeometryError("fixed and moving images must both be 2D or both 3D")
    ndim = fixed.grid.ndim
    axes = tuple(str(a).strip().lower() for a in axes)
    if not axes:
        raise ConfigError("give at least one landscape axis")
    params = _axis_params(axes, ndim)
    ranges = list(ranges)
    if len(ranges) == 1:
        ranges = ranges * len(axes)
    if len(ranges) != len(axes):
        raise ConfigError(f"give one range or one per axis ({len(axes)}), got {len(ranges)}")
    offsets = [_values(tuple(float(v) for v in r)) for r in ranges]
    total = int(np.prod([len(o) for o in offsets]))
    if total > 40_000:
        raise ConfigError(f"the landscape grid has {total} offsets; at most 40000")
    m = get_metric(metric, **metric_kwargs) if isinstance(metric, str) else metric
    name = metric if isinstance(metric, str) else getattr(m, "name", type(m).__name__)
    fdata = fixed.data.to(torch.float32) if not fixed.data.is_floating_point() else fixed.data
    fixed = fixed.with_data(fdata)
    if not moving.data.is_floating_point():
        moving = moving.with_data(moving.data.to(torch.float32))
    if isinstance(fixed_mask, Image):
        fixed_mask = fixed_mask.data[0]
    base_mask = (torch.ones(fixed.grid.shape, dtype=torch.bool, device=fdata.device)
                 if fixed_mask is None else torch.as_tensor(fixed_mask, device=fdata.device) > 0)
    if tuple(base_mask.shape) != tuple(fixed.grid.shape):
        raise GeometryError(f"the fixed mask {tuple(base_mask.shape)} is not on the fixed grid "
                            f"{tuple(fixed.grid.shape)}")
    franges = (m.intensity_range(fdata, base_mask), m.intensity_range(moving.data))
    trainable = bool(getattr(m, "trainable", False)) and hasattr(m, "critic_parameters")
    random = hasattr(m, "reset_generator")
    c = tuple(center) if center is not None else fixed.grid.center
    rigid = Rigid(ndim, center=c, dtype=fdata.dtype, device=fdata.device).requires_grad_(False)

    def warped_at(vals: Sequence[float]):
        t = torch.zeros(ndim, dtype=torch.float64)
        ang = torch.zeros(1 if ndim == 2 else 3, dtype=torch.float64)
        for (kind, k), v in zip(params, vals):
            if kind == "t":
                t[k] = v
            else:
                ang[k] = math.radians(v)
        with torch.no_grad():
            rigid.translation.copy_(t.to(rigid.translation))
            rigid.angles.copy_(ang.to(rigid.angles))
            w, inside = resample_with_mask(moving, rigid, fixed.grid)
        return w.data, inside & base_mask

    def evaluate(w: Tensor, mask: Tensor) -> float:
        if int(mask.sum()) < 8:
            return math.nan
        vals = []
        for r in range(max(repeats, 1) if random else 1):
            if random:
                m.reset_generator(seed + r)
            with torch.no_grad():
                vals.append(float(m(fdata, w, mask=mask, fixed_range=franges[0],
                                    moving_range=franges[1])))
        return float(np.mean(vals))

    start_state = None
    if trainable:
        w0, mask0 = warped_at([0.0] * len(axes))
        m.reset_generator(seed)
        _fit_critic(m, fdata, w0, mask0, franges, warmup_steps, getattr(m, "critic_lr", 1e-3))
        start_state = copy.deepcopy(m.critic.state_dict())
    loss = np.full([len(o) for o in offsets], np.nan)
    for done, idx in enumerate(np.ndindex(loss.shape)):
        vals = [float(o[i]) for o, i in zip(offsets, idx)]
        w, mask = warped_at(vals)
        if trainable and int(mask.sum()) >= 8:
            m.critic.load_state_dict(start_state)
            m.reset_generator(seed)
            _fit_critic(m, fdata, w, mask, franges, fit_steps, getattr(m, "critic_lr", 1e-3))
        loss[idx] = evaluate(w, mask)
        if progress is not None:
            progress(done + 1, total)
    if trainable:
        m.critic.load_state_dict(start_state)
    optima = count_local_optima(loss, plateau_tol)
    widths, censored = [], []
    if optima:
        best = optima[0]
        resp = -loss
        lo_all = float(np.nanmin(resp))
        for k in range(len(axes)):
            sl = list(best)
            sl[k] = slice(None)
            w, cflag = fwhm(offsets[k], resp[tuple(sl)], best[k], baseline=lo_all)
            widths.append(w)
            censored.append(cflag)
    else:
        widths, censored = [math.nan] * len(axes), [True] * len(axes)
    settings = {"ranges": [list(map(float, r)) for r in ranges], "center": list(map(float, c)),
                "plateau_tol": plateau_tol, "seed": seed, "trainable_metric": trainable,
                "metric_config": m.config() if hasattr(m, "config") else {}}
    if trainable:
        settings.update({"warmup_steps": warmup_steps, "fit_steps": fit_steps})
    if random:
        settings["repeats"] = repeats
    quantity = None
    if hasattr(m, "quantity"):
        quantity = np.asarray(m.quantity(torch.from_numpy(np.asarray(loss, dtype=np.float64))),
                              dtype=np.float64)
    return Landscape(str(name), getattr(m, "quantity_name", "loss"),
                     float(getattr(m, "quantity_sign", 1.0)), axes, offsets, loss, optima,
                     widths, censored, settings, quantity)


# ---------------------------------------------------------------------------------- outputs
def _label(axis: str) -> str:
    return f"{axis} ({'deg' if axis.startswith('r') else 'mm'})"


def save_landscape(land: Landscape, outdir: str | os.PathLike) -> dict[str, Path]:
    """Write ``landscape.csv``, ``landscape.png`` and ``summary.json`` into ``outdir``.

    The CSV has one row per offset: the axis values, the loss and the metric quantity. The PNG
    shows the quantity (higher = better aligned for similarity quantities) as a curve for one
    axis, or as a surface with contours for two axes (further axes: the slice through the
    best offset); local optima are marked.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    q = land.quantity_values
    paths = {"csv": out / "landscape.csv", "png": out / "landscape.png",
             "summary": out / "summary.json"}
    with open(paths["csv"], "w", newline="") as fh:
        wr = csv.writer(fh)
        wr.writerow([*land.axes, "loss", land.quantity_name])
        for idx in np.ndindex(land.loss.shape):
            wr.writerow([f"{land.offsets[k][i]:.6g}" for k, i in enumerate(idx)]
                        + [f"{land.loss[idx]:.9g}", f"{q[idx]:.9g}"])
    title = (f"{land.metric}: {land.n_optima} local optim{'um' if land.n_optima == 1 else 'a'}, "
             "FWHM " + ", ".join(f"{a} {'>' if c else ''}{w:.3g}" for a, w, c in
                                 zip(land.axes, land.fwhm, land.fwhm_censored)))
    if len(land.axes) == 1:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(land.offsets[0], q, "-", color="C0")
        for (i,) in land.optima:
            ax.plot(land.offsets[0][i], q[i], "o", color="C3")
        ax.set_xlabel(_label(land.axes[0]))
        ax.set_ylabel(land.quantity_name)
        ax.grid(alpha=0.3)
    else:
        sl: list[Any] = [slice(None), slice(None)]
        if len(land.axes) > 2 and land.optima:
            sl += list(land.optima[0][2:])
        elif len(land.axes) > 2:
            sl += [0] * (len(land.axes) - 2)
        z = q[tuple(sl)].T  # rows: second axis
        xx, yy = np.meshgrid(land.offsets[0], land.offsets[1])
        fig = plt.figure(figsize=(11, 4.8))
        ax3 = fig.add_subplot(1, 2, 1, projection="3d")
        ax3.plot_surface(xx, yy, np.nan_to_num(z, nan=np.nanmin(z)), cmap="viridis",
                         linewidth=0, antialiased=True)
        ax3.set_xlabel(_label(land.axes[0]))
        ax3.set_ylabel(_label(land.axes[1]))
        ax3.set_zlabel(land.quantity_name)
        ax = fig.add_subplot(1, 2, 2)
        cs = ax.contourf(xx, yy, z, levels=20, cmap="viridis")
        fig.colorbar(cs, ax=ax, label=land.quantity_name)
        for idx in land.optima:
            if len(idx) > 2 and list(idx[2:]) != list(sl[2:]):
                continue
            ax.plot(land.offsets[0][idx[0]], land.offsets[1][idx[1]], "o", color="C3", ms=4)
        ax.set_xlabel(_label(land.axes[0]))
        ax.set_ylabel(_label(land.axes[1]))
        ax.set_aspect("auto")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(paths["png"], dpi=90)
    plt.close(fig)
    with open(paths["summary"], "w") as fh:
        json.dump(land.summary(), fh, indent=2)
    return paths
