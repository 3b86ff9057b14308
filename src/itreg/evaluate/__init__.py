"""Evaluation measures and figures."""

from itreg.evaluate.figures import save_comparison_figure
from itreg.evaluate.geometry import WarpingError, warping_error

__all__ = ["WarpingError", "save_comparison_figure", "warping_error"]
