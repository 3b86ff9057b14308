"""co_register's numbers pinned to the loop it had at commit f8d150d (its own Adam and
cosine step decay), so that running it through the engine's optimiser changes nothing.

The values were printed by that commit's code for a float64 3-image 2D group (translation with
a cosine decay over two levels, rigid, a two-level FFD with bending energy; unbiased and
group-to-reference; X-CoReg and APE): every level's loss at every iteration and the first
parameters of each image's final transform.
"""

from __future__ import annotations

import pytest
import torch
from gw_data import make_group

from itreg.groupwise import GroupStage, register_group
from itreg.image import Image

#: (losses per level, first <= 4 values of each parameter tensor per image) at f8d150d.
PINNED = {
    'xmetric-None': (
        [[-0.2489375997, -0.4764564182, -0.9474469207, -1.211712681],
         [-1.329258099, -1.435858167, -1.59268129, -1.592150169],
         [-1.662997864, -1.702586398, -1.804893483],
         [-1.904761244, -2.268694176, -2.010840398],
         [-1.821432827, -1.847067432, -1.936448504]],
        [[3.998927229, -3.542831133, 0.006195454502, -0.1336306425, 0.1011788176, 0.3695762716, -0.02699361228, 0.2794811021, 0.3066705689, -0.001139517005, -0.2709160721],
         [-4.445652384, 1.692761847, -0.007594186668, 0.3117224651, 0.1818783132, -0.3449038522, -0.1847529448, -0.3497337199, -0.1410487398, -0.3666125773, 0.07600927227],
         [0.4467251555, 1.850069286, 0.001398732166, -0.1780918226, -0.2830571308, -0.02467241936, 0.211746557, 0.07025261781, -0.165621829, 0.3677520943, 0.1949067999]]),
    'ape-None': (
        [[-2.597841268, -3.19973015, -2.570774451, -2.840471364],
         [-2.336332644, -2.087095693, -2.4119668, -2.416203404],
         [-2.736971098, -2.491746298, -2.455177453],
         [-3.353799181, -3.594420916, -3.839196835],
         [-2.855118242, -2.681580667, -2.795247066]],
        [[1.343353358, -3.345788925, -0.01953053325, -0.2630798378, 0.1425747181, 0.1746865973, 0.07997083026, 0.07949249978, -0.1489713006, -0.1607403402, -0.3796340016],
         [-1.944443445, 2.438564984, -0.01538630768, 0.1290124446, 0.2211452946, 0.232148116, 0.539686545, -0.5503970786, -0.07464155232, 0.3291392184, 0.167890271],
         [0.6010900871, 0.907223941, 0.03491684093, 0.1340673932, -0.3637200127, -0.4068347133, -0.6196573753, 0.4709045788, 0.223612853, -0.1683988782, 0.2117437306]]),
    'xmetric-1': (
        [[-0.2856919837, -0.6894510121, -1.085676453, -1.118511762],
         [-0.9885798693, -1.010911637, -1.128127576, -1.136278948],
         [-1.284792664, -1.140988771, -1.172893606],
         [-1.06158044, -1.503212169, -1.44032661],
         [-1.230243469, -1.307863813, -1.19192575]],
        [[7.439099943, 0.4339883441, 0.02026080053, -0.6958810566, -0.6972908013, -0.2728369273, 0.2473392208, -0.2919600055, -0.3125097441, -0.7056698078, -0.2521130592],
         [0, 0],
         [3.789872736, 1.825525209, 0.00743369235, -0.1774229237, 0.182218734, 0.2453404414, 0.2444254706, -0.2428653578, 0.6995473969, 0.7421175581, 0.3493457981]]),
    'ape-1': (
        [[-2.597841268, -3.094012934, -2.550792913, -3.006160395],
         [-2.354674681, -2.368752106, -2.647296449, -2.497949449],
         [-2.86854135, -2.751296648, -2.628270113],
         [-3.686956521, -3.825308851, -4.136132881],
         [-3.123044798, -2.832879921, -2.816440861]],
        [[2.811656497, -6.376328706, 0.02296167311, 0.1799837701, 0.3094956963, 0.6854532753, 0.3216585323, 0.2302822298, 0.2811393803, 0.6864840242, 0.2736380181],
         [0, 0],
         [2.678478984, 2.677481078, 0.02490049098, 0.226165927, 0.2464612445, 0.7253182363, 0.742894765, -0.3861604799, -0.3121343844, -0.7126196496, -0.7540564973]]),
}


def _run(metric: str, reference: int | None):
    images, _ = make_group(shifts=[(4.0, -3.0), (-3.0, 4.0), (1.0, 5.0)],
                           angles=[0.05, -0.04, 0.02])
    images = [Image(i.data.double(), i.grid, is_label=False) for i in images]
    stages = [GroupStage("translation", (2, 1), 4, final_lr_factor=0.5),
              GroupStage("rigid", (1,), 3),
              GroupStage("ffd", (2, 1), 3, learning_rate=0.5, control_spacing_mm=30.0,
                         bending_weight=1e-2, final_lr_factor=0.1)]
    options = {"k": 4} if metric == "xmetric" else {}
    result = register_group(images, metric=metric, stages=stages, reference=reference, seed=3,
                            **options)
    losses = [list(r.losses) for r in result.records]
    params = [[float(v) for p in t.parameters() for v in p.detach().reshape(-1)[:4]]
              for t in result.transforms]
    return losses, params


@pytest.mark.parametrize("key", sorted(PINNED))
def test_co_register_matches_the_numbers_of_its_former_loop(key):
    metric, ref = key.split("-")
    losses, params = _run(metric, None if ref == "None" else int(ref))
    want_losses, want_params = PINNED[key]
    assert [len(v) for v in losses] == [len(v) for v in want_losses]
    for got, want in zip(losses, want_losses):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
    for got, want in zip(params, want_params):
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64),
                                   torch.tensor(want, dtype=torch.float64), rtol=1e-6, atol=1e-6)
