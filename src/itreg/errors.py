"""The itreg exception hierarchy.

Every error a user can cause derives from :class:`ItregError`; the CLI turns these into exit
code 2 with a one-line message. Any other exception escaping itreg is a bug.
"""

from __future__ import annotations


class ItregError(Exception):
    """Base class of all errors caused by input, configuration or files."""


class ImageReadError(ItregError):
    """An image file is missing, unreadable, truncated or not an image."""


class ImageFormatError(ItregError):
    """An image has an unsupported pixel type, extension or layout."""


class InvalidImageError(ItregError):
    """Image content is unusable: NaN/Inf voxels, constant, or empty."""


class GeometryError(ItregError):
    """Dimension mismatch, degenerate geometry, or images that do not overlap."""


class MaskError(ItregError):
    """A mask is empty, not binary-compatible, or lies on another grid."""


class TransformFileError(ItregError):
    """A transform file is missing, malformed or of an unsupported type."""


class ModelFileError(ItregError):
    """A model file is not an itreg model, is truncated, or has another version."""


class ConfigError(ItregError):
    """An unknown name or an invalid number in the configuration."""


class OutputExistsError(ItregError):
    """An output file or folder exists and overwriting was not requested."""


class OutputPathError(ItregError):
    """An output path cannot be written (no permission, a file where a folder is needed, a full
    disk)."""


class ConvergenceError(ItregError):
    """The optimiser did not converge and the caller asked for strict convergence."""


def unknown_name(kind: str, name: str, valid) -> ConfigError:
    """Build the ConfigError for an unknown registry name, listing the valid ones."""
    names = ", ".join(sorted(valid))
    return ConfigError(f"unknown {kind} {name!r}; valid {kind}s are: {names}")
