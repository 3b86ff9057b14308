"""itreg: information-theoretic and learned registration of medical images."""

from itreg.api import RegistrationResult, available_presets, register
from itreg.errors import ItregError
from itreg.grid import Frame, Grid
from itreg.groupwise import GroupResult, register_group
from itreg.image import Image

__version__ = "0.1.0"

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
