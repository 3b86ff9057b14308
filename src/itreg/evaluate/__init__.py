"""Evaluation measures, reports and figures.

* :mod:`~itreg.evaluate.overlap`: :func:`dice` per label and mean.
* :mod:`~itreg.evaluate.surface`: :func:`surface_distance` (HD95, ASD, HD in world mm).
* :mod:`~itreg.evaluate.landmarks`: TRE over landmark pairs, paper 000's FRE.
* :mod:`~itreg.evaluate.geometry`: :func:`warping_error` against a ground-truth transform.
* :mod:`~itreg.evaluate.groupwise`: paper 002's gWI and gRE.
* :mod:`~itreg.evaluate.jacobian`: :func:`jacobian_statistics` (folding, std det J, SDlogJ).
* :mod:`~itreg.evaluate.report`: :func:`evaluate_registration`, JSON and Markdown reports.
"""

from itreg.evaluate.figures import save_comparison_figure
from itreg.evaluate.geometry import WarpingError, warping_error
from itreg.evaluate.groupwise import (
    GroupwiseError,
    groupwise_registration_error,
    groupwise_warping_index,
)
from itreg.evaluate.jacobian import JacobianStats, jacobian_statistics
from itreg.evaluate.landmarks import (
    DistanceStats,
    distance_stats,
    fiducial_registration_error,
    random_points_in_mask,
    target_registration_error,
)
from itreg.evaluate.overlap import DiceResult, dice
from itreg.evaluate.report import evaluate_registration, report_markdown, write_report
from itreg.evaluate.surface import SurfaceDistance, surface_distance, surface_distances_per_label

__all__ = [
    "DiceResult",
    "DistanceStats",
    "GroupwiseError",
    "JacobianStats",
    "SurfaceDistance",
    "WarpingError",
    "dice",
    "distance_stats",
    "evaluate_registration",
    "fiducial_registration_error",
    "groupwise_registration_error",
    "groupwise_warping_index",
    "jacobian_statistics",
    "random_points_in_mask",
    "report_markdown",
    "save_comparison_figure",
    "surface_distance",
    "surface_distances_per_label",
    "target_registration_error",
    "warping_error",
    "write_report",
]
