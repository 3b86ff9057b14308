"""summary.csv / summary.html and their checkerboard thumbnails; the page opened in headless
Chromium (skipped where Debian's ``chromium`` is not installed)."""

from __future__ import annotations

import csv
import re
import shutil
import subprocess

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from itreg.batch.summary import write_csv, write_html
from itreg.batch.thumbnails import checkerboard, png_bytes
from itreg.grid import Grid
from itreg.image import Image


def _image(values: np.ndarray, spacing) -> Image:
    data = torch.as_tensor(values, dtype=torch.float32)[None]
    return Image(data, Grid(tuple(reversed(values.shape)), spacing))


def test_checkerboard_alternates_tiles_and_keeps_millimetres(tmp_path):
    rng = np.random.default_rng(0)
    a = _image(rng.random((20, 40)), (1.0, 2.0))  # 40 mm wide, 40 mm high
    b = _image(rng.random((20, 40)), (1.0, 2.0))
    board = checkerboard(a, b, size=60, tiles=6)
    assert board.shape == (60, 60)  # square in mm, so square in pixels
    only_a, only_b = checkerboard(a, a, size=60, tiles=6), checkerboard(b, b, size=60, tiles=6)
    rows, cols = np.mgrid[:60, :60]
    odd = (rows // 10 + cols // 10) % 2 == 1  # 6 tiles of 10 pixels
    np.testing.assert_array_equal(board, np.where(odd, only_b, only_a))
    assert (only_a != only_b).mean() > 0.9
    png = tmp_path / "t.png"
    png.write_bytes(png_bytes(board))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(png))), board)
    three_d = _image(np.random.default_rng(0).random((5, 8, 8)), (1.0, 1.0, 3.0))
    assert checkerboard(three_d, three_d, size=16).shape == (16, 16)


def _records(n: int):
    rng = np.random.default_rng(1)
    records, thumbs = [], {}
    for i in range(n):
        failed = i % 5 == 3
        record = {"id": f"sub-{i:02d}", "kind": "pair", "status": "failed" if failed else "done",
                  "ran": "this run", "job_s": float(rng.uniform(1, 50)),
                  "final_metric": None if failed else float(rng.uniform(0.1, 1)),
                  "quantity": "MI (nats)", "stop_reasons": ["max-iterations"],
                  "started": 1.8e9 + i, "error": "image 'x<&>.nii.gz' does not exist"
                  if failed else None, "output": f"sub-{i:02d}/"}
        records.append(record)
        if not failed:
            thumbs[record["id"]] = png_bytes((rng.random((30, 40)) * 255).astype(np.uint8))
    return records, thumbs


def test_summary_csv_and_self_contained_html(tmp_path):
    records, thumbs = _records(10)
    write_csv(records, tmp_path / "summary.csv")
    with open(tmp_path / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["id"] for r in rows] == [r["id"] for r in records]
    assert rows[3]["status"] == "failed" and rows[3]["error"].startswith("image 'x<&>")
    assert rows[0]["stop_reasons"] == "max-iterations" and rows[0]["started"].endswith("Z")
    page = write_html(records, tmp_path / "summary.html", thumbnails=thumbs).read_text()
    assert page.count('<tr class="failed"') == 2 and page.count('<tr class="done"') == 8
    assert page.count("data:image/png;base64,") == 8
    assert "x&lt;&amp;&gt;" in page and "x<&>" not in page  # escaped
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing from a network


CHROMIUM = shutil.which("chromium")


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
def test_summary_html_renders_every_row_and_thumbnail_in_chromium(tmp_path):
    records, thumbs = _records(16)
    page = write_html(records, tmp_path / "summary.html", thumbnails=thumbs)
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=2000"]
    url = page.as_uri() + "#sort=job_s:desc"
    dom = subprocess.run([*args, "--dump-dom", url], capture_output=True, text=True, check=True,
                         timeout=120).stdout
    body = re.search(r"<body([^>]*)>", dom).group(1)
    assert 'data-rows="16"' in body
    assert 'data-thumbs-loaded="13"' in body  # every thumbnail decoded (3 jobs failed)
    assert 'data-sorted="job_s:desc"' in body
    order = re.findall(r'<tr class="\w+" data-id="([^"]+)"', dom)
    expected = [r["id"] for r in sorted(records, key=lambda r: -r["job_s"])]
    assert order == expected
    shot = tmp_path / "shot.png"
    subprocess.run([*args, f"--screenshot={shot}", "--window-size=1400,900", url],
                   capture_output=True, check=True, timeout=120)
    pixels = sitk.GetArrayFromImage(sitk.ReadImage(str(shot)))
    assert pixels.shape[:2] == (900, 1400) and pixels.std() > 10  # a page, not a blank
