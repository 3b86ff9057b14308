"""The names, keys and value converters of the registration settings (``engine.config``,
``engine.overrides``): every check raises :class:`~itreg.errors.ConfigError` naming the
setting's dotted path."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from itreg.errors import ConfigError, unknown_name

#: Names of the transforms a stage can optimise (the registry lives in ``engine.stages``).
#: The most iterations a level may run: a bound that catches typos such as 1e30, far above
#: any useful schedule (the presets use at most a few hundred).
MAX_ITERATIONS = 100_000

#: Other names users of other tools (and itreg's groupwise command) give these transforms.
TRANSFORM_ALIASES = {"ffd": "bspline", "b-spline": "bspline", "bsplines": "bspline",
                     "syn": "svf", "demons": "dense", "displacement": "dense"}

TRANSFORM_NAMES = ("translation", "rigid", "similarity", "affine", "bspline", "dense", "svf")
#: Linear stage transforms; they must come before the non-linear ones.
LINEAR_TRANSFORM_NAMES = ("translation", "rigid", "similarity", "affine")
#: Optimiser names (the registry lives in ``engine.optimizers``).
OPTIMIZER_NAMES = ("adam", "gd", "lbfgs", "powell")
#: Sampling strategies (the registry lives in ``engine.objective``).
SAMPLING_STRATEGIES = ("random", "full")


# ---------------------------------------------------------------------------------- converters
def _fail(path: str, message: str) -> ConfigError:
    return ConfigError(f"setting '{path}': {message}")


def _as_float(value: Any, path: str, low: float = -math.inf, high: float = math.inf,
              low_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _fail(path, f"expected a number, got {value!r}")
    v = float(value)
    if not math.isfinite(v) or v < low or v > high or (low_open and v == low):
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        if high < math.inf:
            bound += f" and <= {high:g}"
        raise _fail(path, f"expected a finite number {bound}, got {value!r}")
    return v


def _as_int(value: Any, path: str, low: int = 0, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (isinstance(value, float) and not math.isfinite(value)) or int(value) != value:
        raise _fail(path, f"expected an integer, got {value!r}")
    if int(value) < low:
        raise _fail(path, f"expected an integer >= {low}, got {value!r}")
    if high is not None and int(value) > high:
        raise _fail(path, f"expected an integer <= {high}, got {value!r}")
    return int(value)


def _as_bool(value: Any, path: str) -> bool:
    if not isinstance(value, bool):
        raise _fail(path, f"expected true or false, got {value!r}")
    return value


def _as_choice(value: Any, path: str, choices: Sequence[str], kind: str) -> str:
    if not isinstance(value, str) or value not in choices:
        err = unknown_name(kind, str(value), choices)
        raise ConfigError(f"setting '{path}': {err}")
    return value


def _check_keys(data: Mapping, valid: Sequence[str], path: str) -> None:
    if not isinstance(data, Mapping):
        raise _fail(path or "config", f"expected a table of settings, got {data!r}")
    unknown = [k for k in data if k not in valid]
    if unknown:
        where = f"'{path}'" if path else "the registration config"
        raise ConfigError(
            f"unknown setting(s) {', '.join(repr(k) for k in unknown)} in {where}; "
            f"valid keys are: {', '.join(valid)}"
        )


def _per_level(value: Any, path: str, convert: Callable[[Any, str], Any]) -> tuple:
    if isinstance(value, (list, tuple)):
        if not value:
            raise _fail(path, "expected at least one value")
        return tuple(convert(v, f"{path}[{i}]") for i, v in enumerate(value))
    return (convert(value, path),)


def _broadcast(values: tuple, n: int, path: str) -> tuple:
    if len(values) == n:
        return values
    if len(values) == 1:
        return values * n
    raise _fail(path, f"has {len(values)} values but the stage has {n} levels (one per 'shrink' "
                      "factor); give one value or one per level")


def _plain(value: Any) -> Any:
    """A JSON/TOML-friendly deep copy (tuples become lists)."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


#: Valid keys of the setting tables.
_SAMPLING_KEYS = ("strategy", "count", "fraction", "jitter")
_CONVERGENCE_KEYS = ("tolerance", "window", "abs_tolerance")
_STAGE_KEYS = (
    "transform", "metric", "optimizer", "learning_rate", "optimizer_options", "shrink",
    "smoothing_mm", "iterations", "sampling", "convergence", "regularisers",
    "control_spacing_mm", "svf_steps", "gradient_smoothing_mm",
)


__all__ = ["LINEAR_TRANSFORM_NAMES", "MAX_ITERATIONS", "OPTIMIZER_NAMES", "SAMPLING_STRATEGIES",
           "TRANSFORM_ALIASES", "TRANSFORM_NAMES"]
