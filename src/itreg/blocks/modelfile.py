"""The model-file format shared by all learned metrics (DITR, MINE/KLDivNet critics, DeepSim).

A model file is a torch file (``torch.save``) holding one dict of plain data::

    {
        "format": "itreg-model",
        "version": 1,
        "kind": "mine-critic",          # which builder rebuilds the module
        "config": {...},                # plain JSON-able constructor settings
        "state_dict": {name: Tensor},   # the weights
        "extra": {...},                 # plain JSON-able metadata (training log, seed, ...)
    }

Files are written atomically (a crash leaves the old file or none) and read with
``torch.load(weights_only=True)``: reading a model file never unpickles arbitrary objects, so a
foreign or malicious pickle is refused with :class:`~itreg.errors.ModelFileError` instead of
executing code. Anything that is not such a dict, is truncated, has another ``version`` or
another ``kind`` than expected raises :class:`~itreg.errors.ModelFileError` naming the file.

A module family registers a builder with :func:`register_model_kind`; :func:`build_model`
then rebuilds the ``nn.Module`` from the file alone (``builder(config)`` followed by
``load_state_dict``).

Example:
    >>> import torch, tempfile, os
    >>> from itreg.blocks.modelfile import save_model, load_model
    >>> path = os.path.join(tempfile.mkdtemp(), "m.pt")
    >>> save_model(path, "demo", {"n": 2}, torch.nn.Linear(2, 1).state_dict())
    >>> load_model(path, expected_kind="demo")[1]
    {'n': 2}
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from itreg.errors import ConfigError, ModelFileError, unknown_name

__all__ = [
    "FORMAT",
    "VERSION",
    "available_model_kinds",
    "build_model",
    "load_model",
    "register_model_kind",
    "save_model",
]

logger = logging.getLogger(__name__)

FORMAT = "itreg-model"
"""The value of the ``format`` field of every itreg model file."""

VERSION = 1
"""The model-file version written by this itreg; other versions are refused."""

ModelBuilder = Callable[[dict[str, Any]], nn.Module]

_KINDS: dict[str, ModelBuilder] = {}


def _plain(value: Any, what: str) -> Any:
    """``value`` as plain JSON data (dict/list/str/int/float/bool/None), or ConfigError."""
    try:
        return json.loads(json.dumps(value, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"the model {what} must be plain JSON-able data: {exc}") from exc


def _plain_state(state_dict: Mapping[str, Any]) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if not isinstance(value, Tensor):
            raise ConfigError(f"state_dict entry {key!r} is {type(value).__name__}, not a tensor")
        out[str(key)] = value.detach().cpu().clone()
    return out


def save_model(
    path: str | os.PathLike,
    kind: str,
    config: Mapping[str, Any],
    state_dict: Mapping[str, Tensor],
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
) -> Path:
    """Write a model file atomically.

    Tensors are stored on the CPU (a model trained on a GPU loads anywhere).

    Args:
        path: the output file (conventionally ``.pt``).
        kind: the model kind, the key of the builder that rebuilds it (for example
            ``"mine-critic"``, ``"ditr"``, ``"deepsim-ae"``).
        config: constructor settings, plain JSON-able data.
        state_dict: the module's ``state_dict()``.
        extra: optional plain JSON-able metadata (training settings, validation log, seed).
        force: replace an existing file (checkpoints during training pass True).

    Returns:
        The written path.

    Raises:
        ConfigError: ``kind`` is empty, or config/extra are not plain data, or the state dict
            holds non-tensors.
        OutputExistsError: ``path`` exists and ``force`` is False.
    """
    from itreg.io.outputs import atomic_output_file
    from itreg.runtime import provenance

    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"a model kind must be a non-empty string, got {kind!r}")
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "kind": kind.strip(),
        "config": _plain(dict(config), "config"),
        "state_dict": _plain_state(state_dict),
        "extra": _plain(dict(extra or {}), "extra"),
        "provenance": provenance(),
    }
    target = Path(path)
    with atomic_output_file(target, force=force) as tmp:
        torch.save(payload, tmp)
    logger.debug("model %r written to %s", kind, target)
    return target


def _first_line(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def load_model(
    path: str | os.PathLike, expected_kind: str | None = None, map_location: Any = "cpu"
) -> tuple[str, dict[str, Any], dict[str, Tensor], dict[str, Any]]:
    """Read a model file without unpickling arbitrary objects (``weights_only=True``).

    Args:
        path: the model file.
        expected_kind: if given, the file must hold this kind.
        map_location: where tensors are loaded (default CPU; move the module afterwards).

    Returns:
        ``(kind, config, state_dict, extra)``.

    Raises:
        ModelFileError: the file is missing, unreadable, truncated, not an itreg model (for
            example a pickle of an arbitrary object, which is refused, not executed), has
            another format version, or holds another kind than ``expected_kind``.
    """
    p = Path(path)
    if not p.is_file():
        raise ModelFileError(f"model file {str(p)!r} does not exist or is not a file")
    if p.stat().st_size == 0:
        raise ModelFileError(f"model file {str(p)!r} is empty (0 bytes): an interrupted copy "
                             "or training? Use a complete model file")
    try:
        payload = torch.load(p, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ModelFileError(
            f"model file {str(p)!r} is not an itreg model: it holds objects other than plain "
            f"data and tensors, which are never unpickled ({_first_line(exc)})"
        ) from exc
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError, KeyError) as exc:
        raise ModelFileError(
            f"model file {str(p)!r} is truncated or not a torch file: {_first_line(exc)}"
        ) from exc
    except Exception as exc:
        raise ModelFileError(
            f"model file {str(p)!r} could not be read as an itreg model: {exc}"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(
            f"model file {str(p)!r} is not an itreg model (no format={FORMAT!r} field)"
        )
    version = payload.get("version")
    if version != VERSION:
        raise ModelFileError(
            f"model file {str(p)!r} has format version {version!r}; this itreg reads version "
            f"{VERSION} only (retrain or convert the model)"
        )
    kind = payload.get("kind")
    config = payload.get("config")
    state = payload.get("state_dict")
    extra = payload.get("extra", {})
    if (
        not isinstance(kind, str)
        or not isinstance(config, dict)
        or not isinstance(state, dict)
        or not isinstance(extra, dict)
        or not all(isinstance(v, Tensor) for v in state.values())
    ):
        raise ModelFileError(
            f"model file {str(p)!r} is malformed: kind, config, state_dict or extra missing or "
            "of the wrong type"
        )
    if expected_kind is not None and kind != expected_kind:
        raise ModelFileError(
            f"model file {str(p)!r} holds a {kind!r} model, but a {expected_kind!r} model is "
            "needed here"
        )
    return kind, config, state, extra


def register_model_kind(kind: str, builder: ModelBuilder, overwrite: bool = False) -> None:
    """Register ``builder(config) -> nn.Module`` for model files of ``kind``.

    Raises:
        ConfigError: empty kind, non-callable builder, or the kind is taken by another builder
            and ``overwrite`` is False.
    """
    if not isinstance(kind, str) or not kind.strip():
        raise ConfigError(f"a model kind must be a non-empty string, got {kind!r}")
    if not callable(builder):
        raise ConfigError(f"the builder for model kind {kind!r} is not callable")
    key = kind.strip()
    if key in _KINDS and _KINDS[key] is not builder and not overwrite:
        raise ConfigError(f"model kind {key!r} is already registered")
    _KINDS[key] = builder


def available_model_kinds() -> list[str]:
    """Sorted registered model kinds."""
    return sorted(_KINDS)


def build_model(
    path: str | os.PathLike, expected_kind: str | None = None, map_location: Any = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild a module from a model file alone.

    Args:
        path: the model file.
        expected_kind: if given, the file must hold this kind.
        map_location: where the weights are loaded.

    Returns:
        ``(module, extra)``: the module in eval mode with the stored weights, and the file's
        metadata. Use :func:`load_model` for the raw fields (kind and config).

    Raises:
        ModelFileError: see :func:`load_model`; also an unregistered kind, or weights that do
            not fit the module built from the stored config.
    """
    kind, config, state, extra = load_model(path, expected_kind, map_location)
    if kind not in _KINDS:
        err = unknown_name("model kind", kind, _KINDS)
        raise ModelFileError(f"model file {str(path)!r}: {err} (import the module that defines it)")
    try:
        module = _KINDS[kind](config)
    except (TypeError, ValueError, ConfigError) as exc:
        raise ModelFileError(
            f"model file {str(path)!r}: its {kind!r} config does not build a model: {exc}"
        ) from exc
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ModelFileError(
            f"model file {str(path)!r}: the weights do not fit the {kind!r} model of its config: "
            f"{_first_line(exc)}"
        ) from exc
    module.eval()
    return module, extra
