"""Image similarity metrics: one registry of named losses (lower = better aligned).

Classic metrics (:mod:`itreg.metrics.classic`): ``"mse"``, ``"ncc"``, ``"lncc"``, ``"mi"``
(Mattes), ``"mi-gaussian"``, ``"nmi"``, ``"joint-entropy"``. Modality-independent metrics:
``"ngf"`` (:mod:`itreg.metrics.ngf`) and ``"mind-ssc"`` (:mod:`itreg.metrics.mind`). All
histogram metrics share the Parzen kernel-density code of :mod:`itreg.metrics.histogram`;
intensity ranges follow a named setting (:mod:`itreg.metrics.intensity`). Learned metrics
register themselves under a prefix and are built from a model file:
``get_metric("ditr:model.pt")``.

Example:
    >>> import torch
    >>> from itreg.metrics import get_metric
    >>> mi = get_metric("mi", bins=32)
    >>> f = torch.rand(1, 16, 16); m = f ** 2
    >>> loss = mi(f, m)                    # -MI in nats
    >>> bool(mi.quantity(loss) > 0)        # MI in nats
    True
"""

from itreg.metrics.base import Metric, check_mask, check_pair, flatten_samples, resolve_range
from itreg.metrics.classic import (
    GaussianMutualInformation,
    JointEntropy,
    LocalNormalizedCrossCorrelation,
    MeanSquaredError,
    MutualInformation,
    NormalizedCrossCorrelation,
    NormalizedMutualInformation,
    gaussian_mutual_information,
    joint_entropy,
    joint_probability,
    lncc,
    mse,
    mutual_information,
    ncc,
    normalized_mutual_information,
)
from itreg.metrics.histogram import (
    KERNELS,
    entropy,
    joint_histogram,
    kernel_padding,
    mutual_information_from_joint,
    parzen_histogram,
    parzen_weights,
    to_bin_coordinates,
)
from itreg.metrics.intensity import (
    DEFAULT_PERCENTILES,
    INTENSITY_MODES,
    intensity_range,
    rescale,
    robust_range,
)
from itreg.metrics.mind import MINDSSC, mind_ssc
from itreg.metrics.ngf import NormalizedGradientFields, ngf, ngf_epsilon, noise_sigma
from itreg.metrics.registry import available_metrics, get_metric, register_metric

for _name, _factory in (
    ("mse", MeanSquaredError),
    ("ncc", NormalizedCrossCorrelation),
    ("lncc", LocalNormalizedCrossCorrelation),
    ("mi", MutualInformation),
    ("mi-gaussian", GaussianMutualInformation),
    ("nmi", NormalizedMutualInformation),
    ("joint-entropy", JointEntropy),
    ("ngf", NormalizedGradientFields),
    ("mind-ssc", MINDSSC),
):
    register_metric(_name, _factory)
del _name, _factory

# Learned metrics register their factories ("mine", "kldiv" and the "prefix:model-file" ones)
# when imported: every metric is registered by itreg.metrics itself.
from itreg.metrics import deepsim as _deepsim  # noqa: F401
from itreg.metrics import ditr as _ditr  # noqa: F401
from itreg.metrics import neural as _neural  # noqa: F401

__all__ = [
    "DEFAULT_PERCENTILES",
    "INTENSITY_MODES",
    "KERNELS",
    "MINDSSC",
    "GaussianMutualInformation",
    "JointEntropy",
    "LocalNormalizedCrossCorrelation",
    "MeanSquaredError",
    "Metric",
    "MutualInformation",
    "NormalizedCrossCorrelation",
    "NormalizedGradientFields",
    "NormalizedMutualInformation",
    "available_metrics",
    "check_mask",
    "check_pair",
    "entropy",
    "flatten_samples",
    "gaussian_mutual_information",
    "get_metric",
    "intensity_range",
    "joint_entropy",
    "joint_histogram",
    "joint_probability",
    "kernel_padding",
    "lncc",
    "mind_ssc",
    "mse",
    "mutual_information",
    "mutual_information_from_joint",
    "ncc",
    "ngf",
    "ngf_epsilon",
    "noise_sigma",
    "normalized_mutual_information",
    "parzen_histogram",
    "parzen_weights",
    "register_metric",
    "rescale",
    "resolve_range",
    "robust_range",
    "to_bin_coordinates",
]
