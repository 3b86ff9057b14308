"""One call that evaluates a registration, and its JSON / Markdown reports."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
from torch import Tensor

from itreg.errors import ConfigError
from itreg.evaluate.geometry import warping_error
from itreg.evaluate.jacobian import jacobian_statistics
from itreg.evaluate.landmarks import target_registration_error
from itreg.evaluate.overlap import dice
from itreg.evaluate.surface import surface_distances_per_label
from itreg.grid import Grid
from itreg.image import Image
from itreg.transforms.base import Transform


def evaluate_registration(
    *,
    fixed_labels: Image | None = None,
    warped_labels: Image | None = None,
    labels: list[int] | None = None,
    surfaces: bool = True,
    fixed_landmarks: Tensor | None = None,
    moving_landmarks: Tensor | None = None,
    transform: Transform | None = None,
    true_transform: Transform | None = None,
    reference: Grid | None = None,
    mask: Image | Tensor | None = None,
    jacobian: bool | None = None,
) -> dict:
    """Evaluate a registration with every measure its inputs allow.

    Each group of inputs adds a section to the result:

    * `fixed_labels` + `warped_labels` (label maps on one grid): ``"dice"`` (per label and
      mean) and, with `surfaces`, ``"surface"`` (HD95, ASD, HD per label and their means, mm);
    * `fixed_landmarks` + `moving_landmarks` (``(N, D)`` world mm): ``"tre"`` through
      `transform` and ``"landmarks_initial"`` (identity);
    * `transform` + `true_transform` + `reference` (the fixed grid): ``"warping_error"``
      (mean, p90, max mm over `mask`);
    * `transform` + `reference` (and `jacobian` not False): ``"jacobian"`` statistics over
      `mask` (folding fraction, std det J, SDlogJ).

    Args:
        fixed_labels: fixed label map.
        warped_labels: moving label map warped onto the fixed grid.
        labels: labels to score (``None``: every nonzero label).
        surfaces: whether to compute surface distances (slower than Dice).
        fixed_landmarks: fixed-space landmarks.
        moving_landmarks: corresponding moving-space landmarks.
        transform: the estimated fixed -> moving transform.
        true_transform: the ground-truth fixed -> moving transform.
        reference: fixed grid for warping error and Jacobian statistics.
        mask: mask on `reference` restricting warping error and Jacobian statistics.
        jacobian: compute Jacobian statistics (``None``: when a transform and grid are given).

    Returns:
        A JSON-serialisable dict (NaN written as ``null`` by :func:`write_report`).

    Raises:
        ConfigError: when no section can be computed from the inputs.
    """
    out: dict = {}
    if (fixed_labels is None) != (warped_labels is None):
        raise ConfigError("label evaluation needs both fixed_labels and warped_labels")
    if fixed_labels is not None:
        if labels is not None:
            present = set(torch.unique(fixed_labels.data).tolist()) | \
                set(torch.unique(warped_labels.data).tolist())
            missing = [lab for lab in labels if lab not in present]
            if missing:
                shown = ", ".join(str(int(v)) for v in sorted(present) if v != 0)
                raise ConfigError(f"label{'s' if len(missing) > 1 else ''} "
                                  f"{', '.join(map(str, missing))} "
                                  f"{'are' if len(missing) > 1 else 'is'} in neither label map "
                                  f"(labels present: {shown or 'none'})")
        d = dice(fixed_labels, warped_labels, labels)
        out["dice"] = d.as_dict()
        if surfaces:
            per = surface_distances_per_label(fixed_labels, warped_labels, labels)
            out["surface"] = {
                "per_label": {str(k): v.as_dict() for k, v in per.items()},
                "mean_hd95_mm": _mean([v.hd95_mm for v in per.values()]),
                "mean_asd_mm": _mean([v.asd_mm for v in per.values()]),
            }
    if (fixed_landmarks is None) != (moving_landmarks is None):
        raise ConfigError("landmark evaluation needs both fixed and moving landmarks")
    if fixed_landmarks is not None:
        out["landmarks_initial"] = target_registration_error(fixed_landmarks,
                                                             moving_landmarks).as_dict()
        if transform is not None:
            out["tre"] = target_registration_error(fixed_landmarks, moving_landmarks,
                                                   transform).as_dict()
    m = mask.data if isinstance(mask, Image) else mask
    if true_transform is not None:
        if transform is None or reference is None:
            raise ConfigError("warping error needs transform, true_transform and reference")
        out["warping_error"] = warping_error(transform, true_transform, reference, m).as_dict()
    if transform is not None and reference is not None and jacobian is not False:
        out["jacobian"] = jacobian_statistics(transform, reference, m).as_dict()
    if not out:
        raise ConfigError(
            "nothing to evaluate: give label maps, landmarks, or a transform with a reference grid"
        )
    return out


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def jsonable(obj):
    """A copy of a report with NaN/Inf replaced by None and keys as strings (JSON-safe)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def _fmt(v) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v)
    return str(v)


def report_markdown(report: dict, title: str = "Registration evaluation") -> str:
    """Render an :func:`evaluate_registration` dict as Markdown tables."""
    r = jsonable(report)
    lines = [f"# {title}", ""]
    if "dice" in r:
        surf = r.get("surface", {}).get("per_label", {})
        lines += ["## Overlap and surface distance", "",
                  "| label | Dice | HD95 (mm) | ASD (mm) |", "|---|---|---|---|"]
        for k, v in r["dice"]["per_label"].items():
            s = surf.get(k, {})
            lines.append(f"| {k} | {_fmt(v)} | {_fmt(s.get('hd95_mm'))} | "
                         f"{_fmt(s.get('asd_mm'))} |")
        lines.append(f"| mean | {_fmt(r['dice']['mean'])} | "
                     f"{_fmt(r.get('surface', {}).get('mean_hd95_mm'))} | "
                     f"{_fmt(r.get('surface', {}).get('mean_asd_mm'))} |")
        lines.append("")
    for key, name in (("landmarks_initial", "Landmark error before registration"),
                      ("tre", "Target registration error"),
                      ("warping_error", "Warping error against the ground truth"),
                      ("jacobian", "Jacobian determinant"),
                      ("jacobian_displacement", "Jacobian determinant of the displacement"),
                      ("gwi", "Groupwise warping index (paper 002, Eq. 49)"),
                      ("gre", "Groupwise registration error (paper 002, Eq. 51)")):
        if key in r:
            lines += [f"## {name}", "", "| measure | value |", "|---|---|"]
            lines += [f"| {k} | {_fmt(v)} |" for k, v in r[key].items()]
            lines.append("")
    for key in r:
        if key not in ("dice", "surface", "landmarks_initial", "tre", "warping_error",
                       "jacobian", "jacobian_displacement", "gwi", "gre"):
            lines += [f"## {key}", "", "```json", json.dumps(r[key], indent=2), "```", ""]
    return "\n".join(lines)


def write_report(report: dict, path: str | os.PathLike, force: bool = False) -> Path:
    """Write a report as JSON (``.json``) or Markdown (``.md``), atomically.

    Raises:
        ConfigError: another extension.
        OutputExistsError: the file exists and `force` is False.
    """
    from itreg.io import atomic_output_file

    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".json", ".md"):
        raise ConfigError(f"report {str(p)!r}: use a .json or .md file name")
    text = (json.dumps(jsonable(report), indent=2) + "\n" if suffix == ".json"
            else report_markdown(report))
    with atomic_output_file(p, force=force) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return p


