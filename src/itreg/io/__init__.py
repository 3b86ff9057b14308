"""Reading and writing images, masks, transforms, landmarks and outputs.

This is the only package of itreg that imports SimpleITK. Every reader checks its input first
and raises the typed errors of :mod:`itreg.errors` with the file named and the fix stated.
"""

from itreg.io.images import (
    ImageHeader,
    check_image,
    default_max_bytes,
    from_sitk,
    read_header,
    read_image,
    read_mask,
    to_sitk,
    write_image,
)
from itreg.io.landmarks import read_landmarks, write_landmarks
from itreg.io.outputs import (
    atomic_output_dir,
    atomic_output_file,
    check_output_dir,
    check_output_file,
)
from itreg.io.transforms import (
    TRANSFORM_SUFFIXES,
    is_transform_path,
    read_displacement_field,
    read_transform,
    write_displacement_field,
    write_transform,
)

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
