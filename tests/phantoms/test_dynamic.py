"""Dynamic-contrast sequences: curves, motion, ground truth, seeding."""

import pytest
import torch

from itreg.errors import ConfigError, GeometryError
from itreg.phantoms.dynamic import (
    DEFAULT_CURVES,
    dynamic_sequence,
    enhancement_curves,
    sequence_from_tissues,
)
from itreg.phantoms.slices import axial_slices
from itreg.transforms import Affine
from itreg.warp import resample


@pytest.fixture(scope="module")
def slice4(mni4):
    return axial_slices(mni4)


def test_curves_peak_where_asked():
    c = enhancement_curves(21)
    assert c.shape == (21, 3)
    for i, k in enumerate(("csf", "gm", "wm")):
        base, amp, peak = DEFAULT_CURVES[k]
        assert float(c[0, i]) == pytest.approx(base)
        assert int(c[:, i].argmax()) == round(peak * 20)
        assert float(c[:, i].max()) == pytest.approx(base + amp)
    # GM/WM contrast inverts during the sequence.
    assert float(c[0, 1]) < float(c[0, 2]) and float(c[6, 1]) > float(c[6, 2])
    with pytest.raises(ConfigError):
        enhancement_curves(5, {"gm": (0, 1, 0.5)})


def test_sequence_shapes_motion_and_truth(slice4):
    s = sequence_from_tissues(slice4, frames=6, seed=3, noise_sigma=0.0)
    assert len(s.frames) == len(s.labels) == len(s.masks) == len(s.transforms) == 6
    assert s.curves.shape == (6, 3) and s.times_s.shape == (6,)
    assert all(f.grid.same_as(s.grid) for f in s.frames)
    ref = s.transforms[0]
    assert isinstance(ref, Affine) and float(ref.translation.detach().abs().max()) == 0.0
    for t in s.transforms[1:]:
        assert 0 < float(t.translation.detach().abs().max()) <= 3.0
    # Each frame's labels pulled back through T_t match the common labels.
    for lab, t in zip(s.labels, s.transforms):
        with torch.no_grad():
            back = resample(lab, t, s.common_mask.grid)
        assert float((back.data == s.common_labels.data).float().mean()) > 0.97
    # Mean GM intensity follows the GM curve (noise free).
    gm = [float(f.data[lab.data == 2].mean()) for f, lab in zip(s.frames, s.labels)]
    assert int(torch.tensor(gm).argmax()) == int(s.curves[:, 1].argmax())


def test_sequence_seeded(slice4):
    a = sequence_from_tissues(slice4, frames=3, seed=1)
    b = sequence_from_tissues(slice4, frames=3, seed=1)
    c = sequence_from_tissues(slice4, frames=3, seed=2)
    assert torch.equal(a.frames[2].data, b.frames[2].data)
    assert not torch.equal(a.frames[2].data, c.frames[2].data)


def test_sequence_errors(slice4):
    with pytest.raises(ConfigError):
        sequence_from_tissues(slice4, frames=1)
    with pytest.raises(ConfigError):
        sequence_from_tissues(slice4, frames=3, reference_frame=5)
    with pytest.raises(GeometryError):
        dynamic_sequence(ndim=1)
