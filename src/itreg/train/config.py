"""The settings every trainer shares: :class:`TrainingConfig`.

:class:`~itreg.train.regnet_config.TrainNetConfig`, :class:`~itreg.train.ditr_config.
DITRTrainConfig`, :class:`~itreg.train.deepsim.DeepSimTrainConfig` and
:class:`~itreg.train.dcc.DCCTrainConfig` derive from it: each keeps its own defaults for these
fields (a DITR batch is 256 patch pairs, a DCC batch 20 groups) and its own settings, and
the base checks the shared ones and writes the plain-data dict stored in model files.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from itreg.errors import ConfigError

__all__ = ["TrainingConfig", "check_integer", "check_number"]


def check_integer(name: str, value: Any, low: int) -> None:
    """Raise :class:`~itreg.errors.ConfigError` unless `value` is an integer ``>= low``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            not math.isfinite(value) or int(value) != value or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def check_number(name: str, value: Any, low: float = 0.0, strict: bool = True) -> None:
    """Raise :class:`~itreg.errors.ConfigError` unless `value` is a finite number above `low`
    (``> low`` when `strict`, else ``>= low``)."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and \
        math.isfinite(value) and (value > low if strict else value >= low)
    if not ok:
        raise ConfigError(f"{name} must be a number {'>' if strict else '>='} {low:g}, "
                          f"got {value!r}")


@dataclass(frozen=True)
class TrainingConfig:
    """Settings shared by every trainer (subclasses set their own defaults).

    Args:
        epochs: maximum epochs (per stage where a trainer has stages).
        patience: epochs without validation improvement before stopping (0: never).
        batch_size: training items per optimiser step.
        seed: seed of the initial weights, batch order, sampling and augmentation.
        threads: torch CPU threads while training (None: unchanged).
    """

    epochs: int = 10
    patience: int = 5
    batch_size: int = 4
    seed: int = 0
    threads: int | None = None

    def __post_init__(self) -> None:
        check_integer("epochs", self.epochs, 0)
        check_integer("patience", self.patience, 0)
        check_integer("batch_size", self.batch_size, 1)
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, float)) or \
                int(self.seed) != self.seed:
            raise ConfigError(f"seed must be an integer, got {self.seed!r}")
        if self.threads is not None:
            check_integer("threads", self.threads, 1)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able settings (tuples become lists)."""
        out = dataclasses.asdict(self)
        for k, v in out.items():
            if isinstance(v, tuple):
                out[k] = list(v)
        return out
