"""The registry of named metrics: ``get_metric("mi", bins=50)``, ``get_metric("ditr:model.pt")``.

A factory is any callable returning a :class:`~itreg.metrics.base.Metric` (a class or a
function). ``get_metric(name, **kwargs)`` calls the factory registered under ``name`` with the
keyword arguments; a name with a colon, ``"prefix:path"``, calls the factory registered under
``prefix`` with ``path="path"`` (learned metrics loaded from a model file). Names are case
insensitive. Unknown names and keyword arguments the factory does not take raise
:class:`~itreg.errors.ConfigError`.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable
from typing import Any

from itreg.errors import ConfigError, unknown_name
from itreg.metrics.base import Metric

logger = logging.getLogger(__name__)

MetricFactory = Callable[..., Metric]

_REGISTRY: dict[str, MetricFactory] = {}

__all__ = ["MetricFactory", "available_metrics", "get_metric", "register_metric"]


def register_metric(name: str, factory: MetricFactory, overwrite: bool = False) -> None:
    """Register ``factory`` under ``name`` (lower-cased).

    A factory meant for ``"name:path"`` metrics must accept a ``path`` keyword.

    Raises:
        ConfigError: the name is empty, contains a colon or whitespace, or is taken and
            ``overwrite`` is False.
    """
    key = str(name).strip().lower()
    if not key or ":" in key or any(ch.isspace() for ch in key):
        raise ConfigError(f"invalid metric name {name!r}: non-empty, no colon, no whitespace")
    if not callable(factory):
        raise ConfigError(f"the factory for metric {name!r} is not callable")
    if key in _REGISTRY and not overwrite and _REGISTRY[key] is not factory:
        raise ConfigError(f"a metric named {key!r} is already registered")
    _REGISTRY[key] = factory
    logger.debug("registered metric %r -> %r", key, factory)


def available_metrics() -> list[str]:
    """Sorted names of the registered metrics (prefixes such as ``"ditr"`` included)."""
    return sorted(_REGISTRY)


def _check_kwargs(key: str, factory: MetricFactory, kwargs: dict[str, Any]) -> None:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):  # builtins without a signature: let the call decide
        return
    params = signature.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    accepted = sorted(
        p.name
        for p in params
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise ConfigError(
            f"metric {key!r} does not take {', '.join(map(repr, unknown))}; "
            f"its settings are: {', '.join(accepted) or '(none)'}"
        )
    try:
        signature.bind(**kwargs)
    except TypeError as exc:
        raise ConfigError(f"metric {key!r}: {exc}") from exc


def get_metric(name: str, **kwargs: Any) -> Metric:
    """Build the metric registered under ``name`` with the settings ``kwargs``.

    Args:
        name: a registered name (``available_metrics()``), or ``"prefix:path"`` for a metric
            whose factory is registered under ``prefix`` and takes ``path``.
        **kwargs: settings passed to the factory.

    Raises:
        ConfigError: unknown name (the message lists the valid names), unknown or missing
            settings, or invalid values (raised by the metric itself).
    """
    text = str(name).strip()
    prefix, sep, path = text.partition(":")
    key = prefix.strip().lower()
    if key not in _REGISTRY:
        raise unknown_name("metric", text, _REGISTRY)
    factory = _REGISTRY[key]
    if sep:
        if not path:
            raise ConfigError(f"metric {text!r} needs a path after the colon")
        if "path" in kwargs:
            raise ConfigError(f"metric {text!r} already names a path; do not pass path= as well")
        kwargs = {**kwargs, "path": path}
    _check_kwargs(key, factory, kwargs)
    metric = factory(**kwargs)
    if not isinstance(metric, Metric):
        raise ConfigError(
            f"the factory of metric {key!r} returned {type(metric).__name__}, not a Metric"
        )
    return metric
