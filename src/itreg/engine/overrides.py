"""Dotted-key overrides of a registration config's dict form (``--set key=value``).

``stages.<i>.<key>`` sets one stage, a bare stage key (``metric.bins``, ``iterations``) sets
every stage, a top-level key (``min_overlap``) the registration. A ``shrink`` override that
changes a stage's number of levels first adapts the per-level values the stage already has
(:func:`_collapse_levels`, as elastix's per-resolution parameters: the finest levels' values
are kept, a single repeated value stays one value); values given with the new ``shrink`` in the
same call are then checked against the new number of levels.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from itreg.engine.schema import _CONVERGENCE_KEYS, _SAMPLING_KEYS, _STAGE_KEYS
from itreg.errors import ConfigError


def _stage_valid_keys(stage: Mapping) -> list[str]:
    keys = []
    for k in _STAGE_KEYS:
        v = stage.get(k)
        if isinstance(v, Mapping) and k not in ("optimizer_options", "regularisers"):
            valid = {"sampling": _SAMPLING_KEYS, "convergence": _CONVERGENCE_KEYS}.get(k, tuple(v))
            keys.extend(f"{k}.{sub}" for sub in valid)
        else:
            keys.append(k if k not in ("optimizer_options", "regularisers") else f"{k}.<name>")
    return keys


def _set_in_stage(stage: dict, parts: list[str], value: Any, key: str) -> None:
    head = parts[0]
    if head not in _STAGE_KEYS:
        valid = ["stages.<i>.<key>", "min_overlap", "name"] + _stage_valid_keys(stage)
        raise ConfigError(f"unknown setting {key!r}; valid keys are: {', '.join(valid)}")
    if len(parts) == 1:
        if head == "metric" and isinstance(value, str) and value != stage["metric"]["name"]:
            stage["metric"] = {"name": value}  # a new metric drops the old one's options
        elif head == "optimizer" and value != stage["optimizer"]:
            stage["optimizer"] = value  # a new optimiser drops the old one's options
            stage["optimizer_options"] = {}
        else:
            stage[head] = value
        return
    if len(parts) != 2 or not isinstance(stage.get(head), dict):
        raise ConfigError(f"setting {key!r}: '{head}' has no sub-keys")
    sub = parts[1]
    if head == "metric" and sub == "name" and value != stage["metric"].get("name"):
        stage["metric"] = {"name": value}
        return
    if head in ("sampling", "convergence"):
        valid = {"sampling": _SAMPLING_KEYS, "convergence": _CONVERGENCE_KEYS}[head]
        if sub not in valid:
            raise ConfigError(f"unknown setting {key!r}; valid keys of '{head}' are: "
                              f"{', '.join(valid)}")
        if head == "sampling" and sub == "fraction" and "count" in stage[head]:
            stage[head].pop("count")
        if head == "sampling" and sub == "count" and "fraction" in stage[head]:
            stage[head].pop("fraction")
    stage[head][sub] = value


_LEVEL_KEYS = ("learning_rate", "iterations")


def _adapt_levels(values: Any, n: int) -> Any:
    if not isinstance(values, list) or not values:
        return values
    if all(v == values[0] for v in values):
        return values[0]
    if len(values) > n:
        return values[-n:]
    return [values[0]] * (n - len(values)) + values


def _collapse_levels(stages: list[dict], n: int) -> None:
    """Adapt per-level lists to a new number of levels `n` before the shrink factors change:
    lists of one repeated value become that value; longer lists keep their last (finest) `n`
    values; shorter ones repeat their first (coarsest) value in front. Smoothing is derived
    again from the new shrink factors unless it is overridden too."""
    for stage in stages:
        if len(stage.get("shrink", [])) == n:
            continue
        for key in _LEVEL_KEYS:
            stage[key] = _adapt_levels(stage.get(key), n)
        sampling = stage.get("sampling")
        if isinstance(sampling, dict) and "count" in sampling:
            sampling["count"] = _adapt_levels(sampling["count"], n)
        stage["smoothing_mm"] = None


def _level_count(shrink: Any) -> int:
    """The number of levels a ``shrink`` value gives (a number is one level)."""
    return len(shrink) if isinstance(shrink, (list, tuple)) else 1


def apply_override(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    if any(not p for p in parts):
        raise ConfigError(f"invalid setting key {key!r}")
    if parts[0] in ("min_overlap", "name") and len(parts) == 1:
        data[parts[0]] = value
        return
    if parts[0] == "stages":
        n = len(data["stages"])
        if len(parts) < 3 or not parts[1].lstrip("-").isdigit():
            raise ConfigError(f"setting {key!r}: expected 'stages.<index>.<key>' with an index "
                              f"0..{n - 1}")
        i = int(parts[1])
        if not -n <= i < n:
            raise ConfigError(f"setting {key!r}: stage index {i} out of range; this "
                              f"registration has {n} stage(s), 0..{n - 1}")
        if parts[2:] == ["shrink"]:
            _collapse_levels([data["stages"][i]], _level_count(value))
        _set_in_stage(data["stages"][i], parts[2:], value, key)
        return
    if parts == ["shrink"]:
        _collapse_levels(data["stages"], _level_count(value))
    for stage in data["stages"]:
        _set_in_stage(stage, parts, copy.deepcopy(value), key)


__all__ = ["apply_override"]
