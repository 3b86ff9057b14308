"""N4 bias-field correction before groupwise registration (itreg.groupwise.bias)."""

from __future__ import annotations

import json

import pytest
import torch
from gw_data import contrast_image, make_group, phantom_labels

from itreg import io
from itreg.errors import ConfigError
from itreg.grid import Grid
from itreg.groupwise import GroupStage, n4_correct, register_group
from itreg.image import Image

GRID = Grid((64, 64), (2.0, 2.0), (-64.0, -64.0))


def _known_field(strength: float) -> torch.Tensor:
    """A smooth multiplicative field of about +-8 % over the phantom (1 for strength 0)."""
    p = GRID.points(dtype=torch.float32)
    x, y = p[..., 0] / 64, p[..., 1] / 64
    return torch.exp(strength * (0.12 * x - 0.08 * y + 0.06 * x * y))


def _biased(strength: float) -> Image:
    clean = contrast_image(GRID, (0.0, 0.5, 1.0, 0.2), seed=0, noise=0.01)
    # An offset and a scale as z-scoring leaves them: the background is negative.
    return clean.with_data((clean.data * _known_field(strength) - 0.3) / 0.4)


def _relative_error(estimate: torch.Tensor, truth: torch.Tensor, where: torch.Tensor) -> float:
    """Largest deviation of the two fields' shapes (each divided by its mean) over `where`."""
    e, t = estimate[where], truth[where]
    return float(((e / e.mean()) / (t / t.mean()) - 1).abs().max())


def test_n4_recovers_a_known_multiplicative_field_up_to_scale():
    truth = _known_field(1.0)
    body = phantom_labels(GRID) == 1
    assert float(truth[body].max() / truth[body].min()) > 1.15  # a strong field to find
    corrected, field = n4_correct(_biased(1.0))
    assert _relative_error(field.data[0], truth, body) < 0.04
    assert corrected.grid.same_as(GRID) and corrected.dtype == torch.float32
    # The background (the image floor) keeps its level.
    floor = float(_biased(1.0).data.min())
    assert float(corrected.data.min()) == pytest.approx(floor, abs=1e-5)


def test_n4_finds_no_field_in_a_flat_image():
    _, field = n4_correct(_biased(0.0))
    body = phantom_labels(GRID) == 1
    assert _relative_error(field.data[0], torch.ones(GRID.shape), body) < 0.05


def test_n4_with_a_given_mask_uses_it():
    mask = Image((phantom_labels(GRID) > 0).to(torch.uint8)[None], GRID, is_label=True)
    _, field = n4_correct(_biased(1.0), mask=mask)
    body = phantom_labels(GRID) == 1
    assert _relative_error(field.data[0], _known_field(1.0), body) < 0.04


@pytest.mark.parametrize("kwargs", [{"levels": 0}, {"iterations": 0}, {"levels": 1.5}])
def test_n4_bad_settings_are_config_errors(kwargs):
    with pytest.raises(ConfigError):
        n4_correct(_biased(1.0), **kwargs)


def test_n4_mask_on_another_grid_is_a_config_error():
    other = Grid((32, 32), (2.0, 2.0), (-64.0, -64.0))
    with pytest.raises(ConfigError, match="grid"):
        n4_correct(_biased(1.0), mask=Image(torch.ones((1, 32, 32)), other, is_label=True))


def test_register_group_records_the_correction_and_refuses_unknown_names(shifted_group):
    images, _ = shifted_group
    stages = [GroupStage("translation", (2,), 3)]
    with pytest.raises(ConfigError, match="bias correction"):
        register_group(images, stages=stages, bias_correction="n3")
    res = register_group(images, stages=stages, bias_correction="n4")
    assert res.settings["bias_correction"] == "n4"
    assert res.settings["bias_correction_time_s"] > 0
    # The corrected inputs are what was registered (then z-scored as usual).
    plain = register_group(images, stages=stages)
    assert plain.settings["bias_correction"] == "none"
    assert not torch.allclose(res.images[0].data, plain.images[0].data)
    assert float(res.images[0].data.mean()) == pytest.approx(0.0, abs=1e-5)


def test_cli_bias_correction_flag(tmp_path, cli):
    images, _ = make_group(shifts=[(2.0, -1.0), (-1.0, 2.0), (0.0, 1.0)])
    paths = []
    for j, img in enumerate(images):
        paths.append(tmp_path / f"img{j}.nii.gz")
        io.write_image(img, paths[-1])
    out = tmp_path / "out"
    code, _stdout, err = cli(["groupwise", *map(str, paths), "-o", str(out), "--transform",
                              "translation", "--iterations", "2", "--bias-correction", "n4",
                              "--quiet"])
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["bias_correction"] == "n4"
    code, _stdout, err = cli(["groupwise", *map(str, paths), "-o", str(tmp_path / "bad"),
                              "--bias-correction", "n3", "--quiet"])
    assert code != 0 and not (tmp_path / "bad").exists()


def test_n4_in_3d_on_a_shrunk_image_recovers_the_field():
    grid = Grid((24, 24, 24), (3.0, 3.0, 3.0), (-36.0, -36.0, -36.0))
    p = grid.points(dtype=torch.float32)
    x, y, z = (p[..., a] / 36 for a in range(3))
    inside = (x ** 2 + y ** 2 + z ** 2) < 0.8
    core = (x ** 2 + y ** 2 + z ** 2) < 0.25
    clean = torch.where(core, 1.0, torch.where(inside, 0.6, 0.0))
    noise = 0.01 * torch.randn(grid.shape, generator=torch.Generator().manual_seed(1))
    truth = torch.exp(0.1 * x - 0.1 * z)
    img = Image((clean * truth + noise)[None], grid, is_label=False)
    _, field = n4_correct(img, max_voxels=4000)  # 24^3 voxels: fitted at shrink 2
    assert field.grid.same_as(grid)
    assert _relative_error(field.data[0], truth, inside & ~core) < 0.04
