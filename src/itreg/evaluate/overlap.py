"""Label overlap: Dice similarity coefficient per label and its mean."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from itreg.errors import GeometryError
from itreg.image import Image


@dataclass(frozen=True)
class DiceResult:
    """Dice per label and their mean.

    Attributes:
        per_label: ``{label: dice}`` in [0, 1]; a label absent from both maps has no entry.
        mean: mean over ``per_label`` (NaN when empty).
    """

    per_label: dict[int, float]
    mean: float

    def as_dict(self) -> dict:
        return {"per_label": {str(k): v for k, v in self.per_label.items()}, "mean": self.mean}


def _label_tensor(labels: Image | Tensor) -> Tensor:
    data = labels.data if isinstance(labels, Image) else torch.as_tensor(labels)
    if data.is_floating_point():
        data = torch.round(data)
    return data.to(torch.int64)


def dice(
    a: Image | Tensor,
    b: Image | Tensor,
    labels: Sequence[int] | None = None,
) -> DiceResult:
    """Dice ``2 |A_k & B_k| / (|A_k| + |B_k|)`` per label ``k`` of two label maps.

    Args:
        a: label map (an :class:`~itreg.image.Image` ``(1, *S)`` or an integer tensor).
        b: label map of the same shape (for a registration: the warped moving labels on the
            fixed grid).
        labels: the labels to score; ``None`` takes every nonzero label of either map
            (0 is background).

    Returns:
        The :class:`DiceResult`. A label present in only one map scores 0.

    Raises:
        GeometryError: the maps differ in shape (or, for images, in grid).
    """
    if isinstance(a, Image) and isinstance(b, Image) and not a.grid.same_as(b.grid):
        raise GeometryError("label maps lie on different grids; resample one onto the other")
    ta, tb = _label_tensor(a), _label_tensor(b).to(_label_tensor(a).device)
    if ta.shape != tb.shape:
        raise GeometryError(f"label maps have shapes {tuple(ta.shape)} and {tuple(tb.shape)}")
    if labels is None:
        found = torch.unique(torch.cat([torch.unique(ta), torch.unique(tb)]))
        labels = [int(v) for v in found.tolist() if v != 0]
    scores: dict[int, float] = {}
    for k in labels:
        ma, mb = ta == int(k), tb == int(k)
        na, nb = int(ma.sum()), int(mb.sum())
        if na + nb == 0:
            continue
        scores[int(k)] = 2.0 * int((ma & mb).sum()) / (na + nb)
    mean = sum(scores.values()) / len(scores) if scores else float("nan")
    return DiceResult(scores, mean)
