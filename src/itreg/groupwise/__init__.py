"""Groupwise registration: the X-metric, X-CoReg and its baselines (Luo & Zhuang 2022).

* :mod:`~itreg.groupwise.xmetric`: the X-metric (Eq. 8) with the KDE appearance model
  (Eqs. 20-21) and the :class:`XMetric` objective (one EM update per step).
* :mod:`~itreg.groupwise.em`: E-step (Eq. 12), proportions (Eq. 14), initialisation (Eq. 22).
* :mod:`~itreg.groupwise.baselines`: CTE, APE, VI, congealing, GMM.
* :mod:`~itreg.groupwise.mvmm`: Zhuang's multivariate mixture model (MvMM), generalised EM + ICM.
* :mod:`~itreg.groupwise.coreg`: the staged multi-resolution loop (Algorithm 1) with the
  zero-sum projection (Eq. 37) or a fixed reference.
* :mod:`~itreg.groupwise.bias`: optional N4 bias-field correction before registration.
* :mod:`~itreg.groupwise.api`: :func:`register_group`, :class:`GroupResult`, :func:`save_group`.

A trained deep-combined-computing network, which registers and segments a group in one pass,
is applied by :func:`itreg.nets.apply_dcc` (it uses these modules, so it lives above them).
"""

from itreg.groupwise import baselines as _baselines  # noqa: F401  (registers the baselines)
from itreg.groupwise import mvmm as _mvmm  # noqa: F401  (registers MvMM)
from itreg.groupwise.api import GroupResult, register_group, save_group, write_group
from itreg.groupwise.base import (
    GROUP_METRICS,
    GroupObjective,
    available_group_metrics,
    get_group_metric,
    register_group_metric,
)
from itreg.groupwise.bias import BIAS_CORRECTIONS, n4_correct
from itreg.groupwise.coreg import (
    GROUP_TRANSFORMS,
    GroupStage,
    co_register,
    default_stages,
    project_zero_mean,
)
from itreg.groupwise.xmetric import XMetric, x_metric

__all__ = [
    "BIAS_CORRECTIONS",
    "GROUP_METRICS",
    "GROUP_TRANSFORMS",
    "GroupObjective",
    "GroupResult",
    "GroupStage",
    "XMetric",
    "available_group_metrics",
    "co_register",
    "default_stages",
    "get_group_metric",
    "n4_correct",
    "project_zero_mean",
    "register_group",
    "register_group_metric",
    "save_group",
    "write_group",
    "x_metric",
]
