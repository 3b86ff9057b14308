"""Registration settings: frozen, validated dataclasses, TOML presets and dotted overrides.

A :class:`RegistrationConfig` is a sequence of :class:`StageConfig` (for example rigid, then
affine, then B-spline). Each stage runs a multi-resolution schedule whose per-level settings
(``shrink``, ``smoothing_mm``, ``iterations``, ``learning_rate``) are tuples of one value per
level, coarsest level first; a single number in a preset or an override is broadcast to every
level.

Presets are TOML files shipped in ``itreg/presets/`` and loaded by name::

    config = load_preset("affine")
    config = config.with_overrides({"metric.bins": 64, "stages.1.iterations": [100, 50, 20]})

Override keys are dotted paths into :meth:`RegistrationConfig.to_dict`: ``stages.<i>.<key>``
sets one stage, a bare stage key (``metric.bins``, ``iterations``) sets every stage, and a
top-level key (``min_overlap``) sets the registration. Unknown keys and invalid values raise
:class:`~itreg.errors.ConfigError` naming the valid ones.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from itreg.engine.overrides import apply_override
from itreg.engine.schema import (
    _CONVERGENCE_KEYS,
    _SAMPLING_KEYS,
    _STAGE_KEYS,
    LINEAR_TRANSFORM_NAMES,
    MAX_ITERATIONS,
    OPTIMIZER_NAMES,
    SAMPLING_STRATEGIES,
    TRANSFORM_ALIASES,
    TRANSFORM_NAMES,
    _as_bool,
    _as_choice,
    _as_float,
    _as_int,
    _broadcast,
    _check_keys,
    _fail,
    _per_level,
    _plain,
)
from itreg.errors import ConfigError, unknown_name


# ---------------------------------------------------------------------------------- dataclasses
def _set(obj: Any, name: str, value: Any) -> None:
    object.__setattr__(obj, name, value)


@dataclass(frozen=True)
class MetricConfig:
    """The similarity metric of a stage.

    Args:
        name: a name of the metric registry (``"mi"``, ``"nmi"``, ``"ncc"``, ...), or
            ``"kind:path"`` for a learned metric.
        options: keyword arguments of the metric's factory (for example ``bins``). They are
            checked against the factory when the registration starts.
    """

    name: str = "mi"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise _fail("metric.name", f"expected a metric name, got {self.name!r}")
        if not isinstance(self.options, Mapping):
            raise _fail("metric", f"expected a table of metric options, got {self.options!r}")
        _set(self, "options", _plain(self.options))

    def to_dict(self) -> dict:
        return {"name": self.name, **_plain(self.options)}

    @classmethod
    def from_dict(cls, data: Any, path: str = "metric") -> MetricConfig:
        if isinstance(data, MetricConfig):
            return data
        if isinstance(data, str):
            data = {"name": data}
        if not isinstance(data, Mapping):
            raise _fail(path, f"expected a metric name or table, got {data!r}")
        data = dict(data)
        return cls(name=data.pop("name", "mi"), options=data)




@dataclass(frozen=True)
class SamplingConfig:
    """Which fixed-grid points the metric is evaluated on.

    Args:
        strategy: ``"random"`` (a fresh seeded subset of the voxels inside the fixed mask at each
            iteration of Adam and gradient descent, one fixed subset for L-BFGS and Powell) or
            ``"full"`` (every voxel of the level inside the fixed mask).
        count: number of random points per evaluation (capped by the voxels available); one
            number, or one per level of the stage (coarsest first).
        fraction: fraction of the level's voxels to sample; when both ``count`` and
            ``fraction`` are given the smaller number of points is used.
        jitter: move random points uniformly within their voxel, so that sample positions are
            not locked to the voxel lattice (avoids the interpolation artefacts of MI).
    """

    strategy: str = "random"
    count: int | tuple[int, ...] | None = 4096
    fraction: float | None = None
    jitter: bool = True

    def __post_init__(self) -> None:
        p = "sampling"
        _as_choice(self.strategy, f"{p}.strategy", SAMPLING_STRATEGIES, "sampling strategy")
        if self.count is not None:
            counts = _per_level(self.count, f"{p}.count", lambda v, q: _as_int(v, q, low=16))
            _set(self, "count", counts[0] if len(counts) == 1 else counts)
        if self.fraction is not None:
            _set(self, "fraction", _as_float(self.fraction, f"{p}.fraction", 0.0, 1.0,
                                             low_open=True))
        if self.strategy == "random" and self.count is None and self.fraction is None:
            raise _fail(p, "random sampling needs 'count' or 'fraction'")
        _as_bool(self.jitter, f"{p}.jitter")

    def count_at(self, level: int) -> int | None:
        """The sample count of level `level` (None when only a fraction is given)."""
        if isinstance(self.count, tuple):
            return self.count[min(level, len(self.count) - 1)]
        return self.count

    def to_dict(self) -> dict:
        count = list(self.count) if isinstance(self.count, tuple) else self.count
        return {"strategy": self.strategy, "count": count, "fraction": self.fraction,
                "jitter": self.jitter}

    @classmethod
    def from_dict(cls, data: Any, path: str = "sampling") -> SamplingConfig:
        if isinstance(data, SamplingConfig):
            return data
        _check_keys(data, _SAMPLING_KEYS, path)
        data = dict(data)
        if "fraction" in data and "count" not in data:
            data["count"] = None
        return cls(**data)




@dataclass(frozen=True)
class ConvergenceConfig:
    """When a level counts as converged.

    A straight line is fitted to the last ``window`` losses; the level stops with reason
    ``"converged"`` when the change of that line over the window is below
    ``tolerance * max(|mean loss|, 1e-12) + abs_tolerance``. The fit makes the test robust to
    the noise of random sampling.

    Args:
        tolerance: relative change of the loss over the window.
        window: number of iterations in the window (>= 2).
        abs_tolerance: absolute change of the loss over the window.
    """

    tolerance: float = 1e-4
    window: int = 10
    abs_tolerance: float = 0.0

    def __post_init__(self) -> None:
        _set(self, "tolerance", _as_float(self.tolerance, "convergence.tolerance", 0.0))
        _set(self, "window", _as_int(self.window, "convergence.window", low=2))
        _set(self, "abs_tolerance", _as_float(self.abs_tolerance, "convergence.abs_tolerance",
                                              0.0))

    def to_dict(self) -> dict:
        return {"tolerance": self.tolerance, "window": self.window,
                "abs_tolerance": self.abs_tolerance}

    @classmethod
    def from_dict(cls, data: Any, path: str = "convergence") -> ConvergenceConfig:
        if isinstance(data, ConvergenceConfig):
            return data
        _check_keys(data, _CONVERGENCE_KEYS, path)
        return cls(**data)




@dataclass(frozen=True)
class StageConfig:
    """One stage of a registration: a transform optimised over a multi-resolution schedule.

    Per-level settings take one value per level (coarsest first) or a single value for all
    levels; the number of levels is the length of ``shrink``.

    Args:
        transform: ``"translation"``, ``"rigid"``, ``"similarity"``, ``"affine"``,
            ``"bspline"``, ``"dense"`` or ``"svf"``.
        metric: the similarity metric (a :class:`MetricConfig`, a name or a table).
        optimizer: ``"adam"``, ``"gd"`` (regular-step gradient descent), ``"lbfgs"`` or
            ``"powell"``.
        learning_rate: step size per level, in mm of motion per step (the engine optimises
            parameters scaled so that one unit moves points by about 1 mm).
        optimizer_options: extra options of the optimiser (checked by the optimiser; see
            ``engine.optimizers``).
        shrink: integer shrink factor of the fixed grid per level.
        smoothing_mm: Gaussian smoothing sigma per level, in mm. Default: half the shrink
            factor in mm on shrunk levels, 0 at full resolution.
        iterations: maximum number of iterations per level.
        sampling: which points the metric sees.
        convergence: when a level stops early.
        regularisers: ``{name: weight}`` of regularisers added to the loss (non-linear
            transforms only).
        control_spacing_mm: B-spline control-point spacing in mm.
        svf_steps: scaling-and-squaring steps of a stationary velocity field.
        gradient_smoothing_mm: Gaussian sigma in mm with which the gradient of a dense or
            velocity field is smoothed before each step (a fluid-like regularisation of the
            update, as in ANTs SyN and FireANTs); 0 turns it off. Ignored by other transforms.
    """

    transform: str = "affine"
    metric: MetricConfig = field(default_factory=MetricConfig)
    optimizer: str = "adam"
    learning_rate: tuple[float, ...] = (1.0,)
    optimizer_options: Mapping[str, Any] = field(default_factory=dict)
    shrink: tuple[int, ...] = (4, 2, 1)
    smoothing_mm: tuple[float, ...] | None = None
    iterations: tuple[int, ...] = (100,)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    convergence: ConvergenceConfig = field(default_factory=ConvergenceConfig)
    regularisers: Mapping[str, float] = field(default_factory=dict)
    control_spacing_mm: float = 20.0
    svf_steps: int = 7
    gradient_smoothing_mm: float = 0.0

    def __post_init__(self) -> None:
        _as_choice(self.transform, "transform", TRANSFORM_NAMES, "transform")
        _as_choice(self.optimizer, "optimizer", OPTIMIZER_NAMES, "optimizer")
        _set(self, "metric", MetricConfig.from_dict(self.metric))
        _set(self, "sampling", SamplingConfig.from_dict(self.sampling))
        _set(self, "convergence", ConvergenceConfig.from_dict(self.convergence))
        shrink = _per_level(self.shrink, "shrink", lambda v, p: _as_int(v, p, low=1))
        n = len(shrink)
        _set(self, "shrink", shrink)
        smoothing = self.smoothing_mm
        if smoothing is None:
            smoothing = [0.5 * f if f > 1 else 0.0 for f in shrink]
        per_level = {
            "learning_rate": lambda v, p: _as_float(v, p, 0.0, low_open=True),
            "iterations": lambda v, p: _as_int(v, p, low=0, high=MAX_ITERATIONS),
        }
        if isinstance(self.sampling.count, tuple):
            _broadcast(self.sampling.count, n, "sampling.count")
        _set(self, "smoothing_mm", _broadcast(
            _per_level(smoothing, "smoothing_mm", lambda v, p: _as_float(v, p, 0.0)), n,
            "smoothing_mm"))
        for name, convert in per_level.items():
            _set(self, name, _broadcast(_per_level(getattr(self, name), name, convert), n, name))
        if not isinstance(self.optimizer_options, Mapping):
            raise _fail("optimizer_options", f"expected a table, got {self.optimizer_options!r}")
        _set(self, "optimizer_options", _plain(self.optimizer_options))
        if not isinstance(self.regularisers, Mapping):
            raise _fail("regularisers", f"expected a table {{name: weight}}, got "
                                        f"{self.regularisers!r}")
        _set(self, "regularisers", {str(k): _as_float(v, f"regularisers.{k}", 0.0)
                                    for k, v in self.regularisers.items()})
        _set(self, "control_spacing_mm", _as_float(self.control_spacing_mm,
                                                   "control_spacing_mm", 0.0, low_open=True))
        _set(self, "svf_steps", _as_int(self.svf_steps, "svf_steps", low=0))
        _set(self, "gradient_smoothing_mm", _as_float(self.gradient_smoothing_mm,
                                                      "gradient_smoothing_mm", 0.0))

    @property
    def levels(self) -> int:
        """Number of resolution levels."""
        return len(self.shrink)

    @property
    def is_linear(self) -> bool:
        """Whether the stage optimises a linear transform."""
        return self.transform in LINEAR_TRANSFORM_NAMES

    def finest_levels(self, n: int) -> StageConfig:
        """This stage with only its `n` finest levels: every per-level setting (shrink,
        smoothing, learning rate, iterations, sample count) keeps its last `n` values."""
        n = _as_int(n, "levels", low=1)
        if n >= self.levels:
            return self
        data = self.to_dict()
        for key in ("shrink", "smoothing_mm", "learning_rate", "iterations"):
            data[key] = data[key][-n:]
        if isinstance(data["sampling"]["count"], list):
            data["sampling"]["count"] = data["sampling"]["count"][-n:]
        return StageConfig.from_dict(data)

    def to_dict(self) -> dict:
        return {
            "transform": self.transform,
            "metric": self.metric.to_dict(),
            "optimizer": self.optimizer,
            "learning_rate": list(self.learning_rate),
            "optimizer_options": _plain(self.optimizer_options),
            "shrink": list(self.shrink),
            "smoothing_mm": list(self.smoothing_mm),
            "iterations": list(self.iterations),
            "sampling": self.sampling.to_dict(),
            "convergence": self.convergence.to_dict(),
            "regularisers": dict(self.regularisers),
            "control_spacing_mm": self.control_spacing_mm,
            "svf_steps": self.svf_steps,
            "gradient_smoothing_mm": self.gradient_smoothing_mm,
        }

    @classmethod
    def from_dict(cls, data: Any, path: str = "stage") -> StageConfig:
        if isinstance(data, StageConfig):
            return data
        _check_keys(data, _STAGE_KEYS, path)
        data = dict(data)
        try:
            if "metric" in data:
                data["metric"] = MetricConfig.from_dict(data["metric"], f"{path}.metric")
            if "sampling" in data:
                data["sampling"] = SamplingConfig.from_dict(data["sampling"], f"{path}.sampling")
            if "convergence" in data:
                data["convergence"] = ConvergenceConfig.from_dict(data["convergence"],
                                                                  f"{path}.convergence")
            return cls(**data)
        except ConfigError as exc:
            msg = str(exc)
            if msg.startswith("setting '") and not msg.startswith(f"setting '{path}"):
                msg = f"setting '{path}." + msg[len("setting '"):]
            raise ConfigError(msg) from None


@dataclass(frozen=True)
class RegistrationConfig:
    """A whole registration: its stages and the settings shared by all of them.

    Args:
        stages: the stages, run in order; linear stages come first.
        name: the preset this config came from (for reports).
        min_overlap: stop a level with reason ``"no-overlap"`` when the fraction of sampled
            fixed points that map inside the moving image (and masks) falls below this fraction
            of the overlap measured after initialisation.
    """

    stages: tuple[StageConfig, ...] = (StageConfig(),)
    name: str = "custom"
    min_overlap: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.stages, (StageConfig, Mapping)) or not self.stages:
            raise ConfigError("a registration needs a list of at least one stage")
        _set(self, "stages", tuple(StageConfig.from_dict(s, f"stages.{i}")
                                   for i, s in enumerate(self.stages)))
        if not isinstance(self.name, str):
            raise _fail("name", f"expected a string, got {self.name!r}")
        _set(self, "min_overlap", _as_float(self.min_overlap, "min_overlap", 0.0, 1.0,
                                            low_open=True))
        seen_nonlinear = False
        for i, stage in enumerate(self.stages):
            if stage.is_linear and seen_nonlinear:
                raise ConfigError(
                    f"stage {i} ({stage.transform}) is linear but follows a non-linear stage; "
                    "put linear stages (translation, rigid, similarity, affine) first"
                )
            seen_nonlinear |= not stage.is_linear
            if stage.regularisers and stage.is_linear:
                raise ConfigError(
                    f"stage {i} ({stage.transform}) has regularisers "
                    f"{sorted(stage.regularisers)}; regularisers apply to bspline, dense and "
                    "svf stages only"
                )

    def to_dict(self) -> dict:
        """A JSON/TOML-serialisable dict that :meth:`from_dict` reads back."""
        return {"name": self.name, "min_overlap": self.min_overlap,
                "stages": [s.to_dict() for s in self.stages]}

    @classmethod
    def from_dict(cls, data: Any) -> RegistrationConfig:
        """Build from a dict (a parsed TOML file or :meth:`to_dict` output).

        Raises:
            ConfigError: unknown keys or invalid values.
        """
        _check_keys(data, ("name", "min_overlap", "stages"), "")
        stages = data.get("stages")
        if not isinstance(stages, (list, tuple)) or not stages:
            raise _fail("stages", "expected a list of at least one stage")
        return cls(
            stages=tuple(StageConfig.from_dict(s, f"stages.{i}") for i, s in enumerate(stages)),
            name=data.get("name", "custom"),
            min_overlap=data.get("min_overlap", 0.1),
        )

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> RegistrationConfig:
        """A copy with dotted-key overrides applied (see the module docstring).

        Raises:
            ConfigError: an unknown key or an invalid value.
        """
        if not overrides:
            return self
        if not isinstance(overrides, Mapping):
            raise ConfigError(f"overrides must be a dict of dotted keys, got {overrides!r}")
        data = self.to_dict()
        # Shrink factors first: they set the number of levels the other keys are checked against.
        items = sorted(overrides.items(), key=lambda kv: not str(kv[0]).endswith("shrink"))
        for key, value in items:
            apply_override(data, str(key), copy.deepcopy(_plain(value)))
        config = RegistrationConfig.from_dict(data)
        if any(str(k).split(".")[-2:-1] == ["metric"] or str(k).endswith("metric")
               for k in overrides):
            config.check_metrics()
        return config

    def check_metrics(self) -> None:
        """Build each stage's metric (except learned ``kind:path`` ones, which load files) to
        check its name and options.

        Raises:
            ConfigError: unknown metric name or option (listing the valid ones).
        """
        from itreg.metrics import get_metric

        for i, stage in enumerate(self.stages):
            if ":" in stage.metric.name:
                continue
            try:
                get_metric(stage.metric.name, **dict(stage.metric.options))
            except ConfigError as exc:
                raise ConfigError(f"setting 'stages.{i}.metric': {exc}") from None

    def with_metric(self, name: str) -> RegistrationConfig:
        """A copy whose every stage uses the metric `name` (options reset unless same name)."""
        stages = tuple(
            s if s.metric.name == name else _replace(s, metric=MetricConfig(name))
            for s in self.stages
        )
        return RegistrationConfig(stages, self.name, self.min_overlap)

    def with_transform(self, name: str) -> RegistrationConfig:
        """A copy whose last stage optimises the transform `name`."""
        stages = self.stages[:-1] + (_replace(self.stages[-1], transform=name),)
        return RegistrationConfig(stages, self.name, self.min_overlap)


def _replace(stage: StageConfig, **changes) -> StageConfig:
    data = stage.to_dict()
    for k, v in changes.items():
        data[k] = v.to_dict() if hasattr(v, "to_dict") else v
    return StageConfig.from_dict(data)


# ---------------------------------------------------------------------------------- presets
def _preset_dir():
    return importlib.resources.files("itreg").joinpath("presets")


def available_presets() -> list[str]:
    """Names of the presets shipped with itreg (``rigid``, ``affine``, ``bspline``, ...)."""
    return sorted(p.name[: -len(".toml")] for p in _preset_dir().iterdir()
                  if p.name.endswith(".toml"))


def load_preset(name: str) -> RegistrationConfig:
    """Load a shipped preset by name.

    Raises:
        ConfigError: no preset of that name (the message lists the presets).
    """
    text = preset_text(name)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:  # a broken shipped file is a bug, say where
        raise ConfigError(f"preset {name!r} is not valid TOML: {exc}") from exc
    data.setdefault("name", name)
    return RegistrationConfig.from_dict(data)


def preset_text(name: str) -> str:
    """The TOML text of a shipped preset, comments included.

    Raises:
        ConfigError: no preset of that name (the message lists the presets).
    """
    names = available_presets()
    if name not in names:
        raise unknown_name("preset", name, names)
    return _preset_dir().joinpath(f"{name}.toml").read_text(encoding="utf-8")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        if isinstance(value, float) and not math.isfinite(value):
            return "inf" if value > 0 else "-inf" if value < 0 else "nan"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        items = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items() if v is not None]
        return "{ " + ", ".join(items) + " }" if items else "{}"
    raise ConfigError(f"cannot write {value!r} as TOML")


def _toml_key(key: str) -> str:
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def to_toml(config: RegistrationConfig) -> str:
    """`config` as TOML text in the presets' layout (:func:`config_from_toml` reads it back)."""
    data = config.to_dict()
    lines = [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in data.items()
             if k != "stages" and v is not None]
    for stage in data["stages"]:
        lines += ["", "[[stages]]"]
        lines += [f"{_toml_key(k)} = {_toml_value(v)}" for k, v in stage.items() if v is not None]
    return "\n".join(lines) + "\n"


def config_from_toml(text: str) -> RegistrationConfig:
    """Parse a registration config from TOML text (same layout as the presets).

    Raises:
        ConfigError: invalid TOML, unknown keys or invalid values.
    """
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"invalid TOML config: {exc}") from exc
    return RegistrationConfig.from_dict(data)


__all__ = [
    "LINEAR_TRANSFORM_NAMES",
    "MAX_ITERATIONS",
    "OPTIMIZER_NAMES",
    "TRANSFORM_ALIASES",
    "TRANSFORM_NAMES",
    "ConvergenceConfig",
    "MetricConfig",
    "RegistrationConfig",
    "SamplingConfig",
    "StageConfig",
    "available_presets",
    "config_from_toml",
    "load_preset",
    "preset_text",
    "to_toml",
]
