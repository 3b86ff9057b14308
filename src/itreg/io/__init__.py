"""Reading and writing images, masks, transforms, landmarks and outputs.

This is the only package of itreg that imports SimpleITK. Every reader checks its input first
and raises the typed errors of :mod:`itreg.errors` with the file named and the fix stated.
"""

from __future__ import annotations

import importlib

#: Where each public name lives. They load on first use (PEP 562), so that the output checks
#: of a command (:mod:`itreg.io.outputs`, no torch) answer before torch and SimpleITK load.
_NAMES = {
    "images": ("ImageHeader", "check_image", "default_max_bytes", "from_sitk", "read_header",
               "read_image", "read_mask"),
    "writing": ("to_sitk", "write_image"),
    "landmarks": ("read_landmarks", "write_landmarks"),
    "outputs": ("atomic_output_dir", "atomic_output_file", "check_output_dir",
                "check_output_file"),
    "transforms": ("TRANSFORM_SUFFIXES", "is_transform_path", "read_displacement_field",
                   "read_transform", "write_displacement_field", "write_transform"),
}
_WHERE = {name: module for module, names in _NAMES.items() for name in names}


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:  # a submodule not imported yet (itreg.io.series, ...)
        try:
            return importlib.import_module(f"itreg.io.{name}")
        except ModuleNotFoundError as exc:
            if exc.name != f"itreg.io.{name}":
                raise
            raise AttributeError(f"module 'itreg.io' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f"itreg.io.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})


__all__ = [
    "TRANSFORM_SUFFIXES",
    "ImageHeader",
    "atomic_output_dir",
    "atomic_output_file",
    "check_image",
    "check_output_dir",
    "check_output_file",
    "default_max_bytes",
    "from_sitk",
    "is_transform_path",
    "read_displacement_field",
    "read_header",
    "read_image",
    "read_landmarks",
    "read_mask",
    "read_transform",
    "to_sitk",
    "write_displacement_field",
    "write_image",
    "write_landmarks",
    "write_transform",
]
