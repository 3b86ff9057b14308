"""The MNI template: located offline, loaded with derived maps at any spacing."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from itreg.errors import ConfigError, ImageReadError
from itreg.phantoms import load_mni, mni_template_paths
from itreg.phantoms import mni as mni_module

KEYS = {"t1", "gm", "wm", "csf", "mask"}


def test_paths_found_without_importing_nilearn():
    code = (
        "import sys\n"
        "from itreg.phantoms import mni_template_paths\n"
        "paths = mni_template_paths()\n"
        "assert sorted(paths) == ['gm', 't1', 'wm'], paths\n"
        "assert all(p.is_file() for p in paths.values())\n"
        "heavy = [m for m in sys.modules if m.startswith(('nilearn', 'sklearn', 'nibabel', 'requests'))]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_paths_name_the_files():
    paths = mni_template_paths()
    assert paths["t1"].name == "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
    assert paths["gm"].parent == paths["t1"].parent == paths["wm"].parent


def test_missing_nilearn_has_install_hint(monkeypatch):
    monkeypatch.setattr(mni_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ImageReadError, match=r"pip install 'itreg\[data\]' \(nilearn\)"):
        mni_template_paths()


def _check_maps(maps):
    assert set(maps) == KEYS
    grid = maps["t1"].grid
    for name, img in maps.items():
        assert img.grid.same_as(grid), name
        assert img.data.shape == (1, *grid.shape)
    for name in ("t1", "gm", "wm", "csf"):
        data = maps[name].data
        assert data.dtype == torch.float32 and not maps[name].is_label
        assert float(data.min()) >= 0.0 and float(data.max()) <= 1.0
    mask = maps["mask"]
    assert mask.dtype == torch.uint8 and mask.is_label
    inside = mask.data[0] == 1
    assert set(torch.unique(mask.data).tolist()) == {0, 1}
    total = maps["gm"].data[0] + maps["wm"].data[0] + maps["csf"].data[0]
    assert float(total[inside].max()) <= 1.0 + 1e-5
    assert float(maps["csf"].data[0][~inside].abs().max()) == 0.0
    return inside


@pytest.fixture(scope="module")
def mni1():
    return load_mni()


def test_load_native_grid(mni1):
    maps = mni1
    grid = maps["t1"].grid
    assert grid.size == (197, 233, 189) and grid.spacing == (1.0, 1.0, 1.0)
    # LPS as SimpleITK reads the RAS file: origin (-98, -134, -72) RAS -> (98, 134, -72) LPS.
    assert np.allclose(grid.origin, (98.0, 134.0, -72.0))
    assert np.allclose(grid.direction_matrix(), np.diag([-1.0, -1.0, 1.0]))
    inside = _check_maps(maps)
    assert float(maps["t1"].data.max()) == 1.0
    assert torch.equal(inside, maps["t1"].data[0] > 0.2)
    assert 1.7e6 < int(inside.sum()) < 2.1e6  # about 1.9 litres of brain


def test_load_coarse_spacing(mni4, mni1):
    grid = mni4["t1"].grid
    assert grid.spacing == (4.0, 4.0, 4.0)
    assert grid.size == (49, 58, 47)
    # Same centre and direction as the 1 mm template (grid.with_spacing).
    assert np.allclose(grid.center, (0.0, 18.0, 22.0), atol=1e-6)
    assert np.allclose(grid.direction_matrix(), np.diag([-1.0, -1.0, 1.0]))
    inside = _check_maps(mni4)
    # The brain volume is kept (partial-volume fraction >= 0.5), within 5%.
    volume = int(inside.sum()) * 64.0
    assert abs(volume - 1.883e6) / 1.883e6 < 0.05
    # Tissue volumes are kept too (smoothing and linear resampling preserve the mean).
    gm_volume = float(mni4["gm"].data.sum()) * 64.0
    gm_native = float(mni1["gm"].data.sum())
    assert abs(gm_volume - gm_native) / gm_native < 0.03


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_spacing(bad):
    with pytest.raises(ConfigError):
        load_mni(bad)
