"""DITR metric: Eq. 11 sum of logits, model files, robustness, engine use."""

import pytest
import torch

from itreg.blocks.ditr import DITRNet
from itreg.blocks.modelfile import save_model
from itreg.errors import ModelFileError
from itreg.metrics import available_metrics, get_metric
from itreg.metrics.ditr import DITRMetric, patch_centres


@pytest.fixture
def model_file(tmp_path):
    torch.manual_seed(3)
    net = DITRNet(2, channels=(8, 8, 16, 16), spacing_mm=2.0)
    path = tmp_path / "ditr.pt"
    save_model(path, "ditr", net.config(), net.state_dict())
    return path, net


def _images(seed=0, shape=(40, 36)):
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(shape[0]), torch.arange(shape[1]), indexing="ij")
    blob = ((yy - 20.0) ** 2 / 120 + (xx - 18.0) ** 2 / 90 < 1).float()
    fixed = blob * (0.5 + 0.5 * torch.rand(shape, generator=g))
    moving = blob * (1.0 - fixed) + 0.05 * torch.rand(shape, generator=g)
    return fixed[None], moving[None], blob > 0


def test_registered_under_prefix(model_file):
    path, _ = model_file
    assert "ditr" in available_metrics()
    metric = get_metric(f"ditr:{path}")
    assert isinstance(metric, DITRMetric) and metric.requires_spatial


def test_equals_sum_of_logits_computed_independently(model_file):
    path, net = model_file
    metric = get_metric(f"ditr:{path}", stride=6, min_patches=0)
    fixed, moving, mask = _images()
    loss = metric(fixed, moving, mask)
    # Independent computation: scale to [0, 1] by min-max, crop 17x17 patches with zero
    # padding around the stride-6 grid centres inside the mask, sum the network's logits.
    def scale(x):
        return (x - x.min()) / (x.max() - x.min())
    u, v = scale(fixed[0]), scale(moving[0])
    pu = torch.nn.functional.pad(u, [8] * 4)
    pv = torch.nn.functional.pad(v, [8] * 4)
    total, count = 0.0, 0
    for y in range(((40 - 1) % 6) // 2, 40, 6):
        for x in range(((36 - 1) % 6) // 2, 36, 6):
            if not mask[y, x]:
                continue
            a = pu[y:y + 17, x:x + 17]
            if float(a.max() - a.min()) <= 1e-6:
                continue
            pair = torch.stack([a, pv[y:y + 17, x:x + 17]])[None]
            with torch.no_grad():
                total += float(net.eval()(pair)[0])
            count += 1
    assert count > 5
    assert float(loss) == pytest.approx(-total, rel=1e-5, abs=1e-5)
    mean = get_metric(f"ditr:{path}", stride=6, min_patches=0,
                      reduction="mean")(fixed, moving, mask)
    assert float(mean) == pytest.approx(-total / count, rel=1e-5, abs=1e-6)


def test_reload_gives_identical_values(model_file, tmp_path):
    path, _ = model_file
    fixed, moving, mask = _images(1)
    a = get_metric(f"ditr:{path}")(fixed, moving, mask)
    copy = tmp_path / "copy.pt"
    from itreg.blocks.modelfile import load_model
    kind, config, state, extra = load_model(path)
    save_model(copy, kind, config, state, extra)
    b = get_metric(f"ditr:{copy}")(fixed, moving, mask)
    assert torch.equal(a, b)


def test_finite_on_identical_constant_shuffled(model_file):
    path, _ = model_file
    metric = get_metric(f"ditr:{path}")
    fixed, moving, mask = _images(2)
    g = torch.Generator().manual_seed(0)
    shuffled = moving.reshape(-1)[torch.randperm(moving.numel(), generator=g)].reshape(
        moving.shape)
    const = torch.full_like(fixed, 0.3)
    for f, m, msk in [(fixed, fixed, mask), (const, const, None), (fixed, const, mask),
                      (fixed, shuffled, mask), (torch.zeros_like(fixed), moving, None)]:
        assert torch.isfinite(metric(f, m, msk))


def test_gradient_reaches_moving_image(model_file):
    path, _ = model_file
    metric = get_metric(f"ditr:{path}")
    fixed, moving, mask = _images(3)
    moving = moving.clone().requires_grad_(True)
    metric(fixed, moving, mask).backward()
    assert moving.grad is not None and float(moving.grad.abs().sum()) > 0
    assert all(not p.requires_grad for p in metric.network.parameters())


def test_wrong_model_kind_and_dimension(tmp_path, model_file):
    path, _ = model_file
    other = tmp_path / "other.pt"
    save_model(other, "something-else", {}, {})
    with pytest.raises(ModelFileError):
        get_metric(f"ditr:{other}")
    with pytest.raises(Exception, match="2D"):
        get_metric(f"ditr:{path}")(torch.rand(1, 20, 20, 20), torch.rand(1, 20, 20, 20))


def test_patch_centres_always_nonempty():
    mask = torch.zeros(30, 30, dtype=torch.bool)
    mask[3, 4] = True  # off the stride-8 grid
    c = patch_centres(mask, 8)
    assert c.tolist() == [[3, 4]]


def test_patch_grid_is_refined_until_min_count_centres():
    mask = torch.zeros(33, 33, dtype=torch.bool)
    mask[4:29, 4:29] = True  # 25 x 25 voxels
    # Stride 8 on 33 voxels: rows/cols 0, 8, 16, 24, 32 -> 3 x 3 = 9 inside (8, 16, 24).
    assert patch_centres(mask, 8).shape[0] == 9
    # 100 wanted: strides 7, 6, 5, 4, 3 give <= 81 inside; stride 2 (even rows 4..28: 13 x 13).
    c = patch_centres(mask, 8, min_count=100)
    assert c.shape[0] == 169 and bool((c % 2 == 0).all())
    assert patch_centres(mask, 8, min_count=10_000).shape[0] == 625  # stride 1: every voxel


def test_engine_registers_with_ditr_and_powell(model_file):
    import itreg
    from itreg.image import Image
    from itreg.metrics.ditr import ditr_overrides

    path, _ = model_file
    fixed, moving, _ = _images(4)
    f = Image.from_tensor(fixed[0], spacing=(2.0, 2.0))
    m = Image.from_tensor(moving[0], spacing=(2.0, 2.0))
    res = itreg.register(f, m, "rigid", metric=f"ditr:{path}", init="none", progress=False,
                         overrides=ditr_overrides(path, iterations=2))
    assert res.stop_reasons and res.config.stages[0].optimizer == "powell"
    assert all(torch.isfinite(p).all() for p in res.transform.parameters())
