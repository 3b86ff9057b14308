"""itreg: information-theoretic and learned registration of medical images.

The names below are imported on first use (PEP 562), so ``import itreg`` -- and the command
line's ``--help`` or a usage error -- does not pay for torch and SimpleITK before it needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from itreg._version import __version__

#: Public name -> module that defines it.
_LAZY = {
    "Frame": "itreg.grid",
    "Grid": "itreg.grid",
    "GroupResult": "itreg.groupwise",
    "Image": "itreg.image",
    "ItregError": "itreg.errors",
    "RegistrationResult": "itreg.api",
    "available_presets": "itreg.api",
    "register": "itreg.api",
    "register_group": "itreg.groupwise",
}

__all__ = [
    "Frame",
    "Grid",
    "GroupResult",
    "Image",
    "ItregError",
    "RegistrationResult",
    "__version__",
    "available_presets",
    "register",
    "register_group",
]

if TYPE_CHECKING:  # pragma: no cover
    from itreg.api import RegistrationResult, available_presets, register
    from itreg.errors import ItregError
    from itreg.grid import Frame, Grid
    from itreg.groupwise import GroupResult, register_group
    from itreg.image import Image


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'itreg' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
