"""One set of command-line conventions on every command, and outputs that never lose data.

Issue 14: `--force` replaces only itreg's files; an -o that is a file or an input is refused;
`-o .` works; errors (usage errors included) are one line with exit 2; SIGINT and SIGTERM leave
no partial output; DICOM series folders are read as one volume.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
import SimpleITK as sitk
from tests.test_cli import FAST, blob_image

# ------------------------------------------------------------------ conformance

#: Options every command has.
EVERY = ("--output", "--force", "--quiet", "--verbose", "--log")
#: Commands that do not take --seed / --set / --threads / --device, and why.
NO_SEED = {
    "evaluate": "deterministic measures",
    "apply": "deterministic resampling",
    "apply-points": "deterministic mapping",
    "presets list": "prints names", "presets show": "prints a file",
}
NO_SET = {
    "evaluate": "no settings", "apply": "no settings", "apply-points": "no settings",
    "demo": "a fixed recipe", "phantom": "every setting is an option", "presets list": "",
}
NO_THREADS = {"phantom": "fixed data generation", "presets list": "", "presets show": "",
              "apply-points": "a few points"}
NO_DEVICE = {**NO_THREADS, "evaluate": "CPU measures"}


def _commands(group: click.Group, prefix: str = ""):
    for name, cmd in sorted(group.commands.items()):
        full = f"{prefix}{name}"
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, full + " ")
        else:
            yield full, cmd


def _all_commands():
    from itreg.cli import app

    return list(_commands(app))


@pytest.mark.parametrize("name, cmd", _all_commands(), ids=lambda v: v if isinstance(v, str)
                         else "")
def test_every_command_follows_the_convention(name, cmd):
    opts = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    for flag in EVERY:
        assert flag in opts, f"{name} lacks {flag}"
    assert "-o" in opts and "-q" in opts and "-v" in opts
    for flag, exempt in (("--seed", NO_SEED), ("--set", NO_SET), ("--threads", NO_THREADS),
                         ("--device", NO_DEVICE)):
        if name not in exempt:
            assert flag in opts, f"{name} lacks {flag}"
    help_text = cmd.get_help(click.Context(cmd, info_name=name))
    assert "--output" in help_text


def test_the_commands_are_the_documented_ones():
    names = {n for n, _ in _all_commands()}
    assert {"register", "apply", "groupwise", "phantom", "evaluate", "landscape", "demo",
            "train-metric", "train-net", "presets show"} <= names


# ------------------------------------------------------------------ helpers

def _md5s(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line_error(code, err, exit_code=2):
    assert code == exit_code, err
    assert err.startswith("itreg: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err


@pytest.fixture
def inp(tmp_path):
    """A user's input folder: images, a mask, landmarks and notes."""
    folder = tmp_path / "inp"
    folder.mkdir()
    sitk.WriteImage(blob_image(), str(folder / "fixed.nii.gz"))
    sitk.WriteImage(blob_image(shift=(3.0, -2.0), remap=True), str(folder / "moving.nii.gz"))
    mask = sitk.Cast(blob_image() > 0.05, sitk.sitkUInt8)
    sitk.WriteImage(mask, str(folder / "fixed_mask.nii.gz"))
    (folder / "landmarks.csv").write_text("x,y\n1,2\n")
    (folder / "notes.txt").write_text("my notes")
    return folder


# ------------------------------------------------------------------ data safety

def test_force_into_the_input_folder_keeps_every_input_byte_identical(inp, cli):
    before = _md5s(inp)
    code, _, err = cli(["register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"),
                        "--fixed-mask", str(inp / "fixed_mask.nii.gz"), "-o", str(inp),
                        "-t", "rigid", "--force", *FAST])
    assert code == 0, err
    after = _md5s(inp)
    assert {k: after[k] for k in before} == before
    assert {"warped.nii.gz", "transform.tfm", "report.json"} <= set(after)
    # a second --force run replaces itreg's files and still keeps the user's
    code, _, err = cli(["register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"),
                        "-o", str(inp), "-t", "translation", "--force", *FAST])
    assert code == 0, err
    assert {k: _md5s(inp)[k] for k in before} == before


def test_an_output_naming_an_input_or_a_file_is_refused_even_with_force(inp, tmp_path, cli):
    before = _md5s(inp)
    fixed, moving = str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz")
    # -o names the moving image (an ANTs/elastix habit)
    code, _, err = cli(["register", fixed, moving, "-o", moving, "--force", *FAST])
    _one_line_error(code, err)
    assert "file" in err
    # -o names a new file-like path
    code, _, err = cli(["register", fixed, moving, "-o", str(tmp_path / "typo" /
                                                             "moving.nii.gz"), "--force", *FAST])
    _one_line_error(code, err)
    assert "named like a file" in err and not (tmp_path / "typo").exists()
    # -o names an unrelated existing file
    other = tmp_path / "existing_file.txt"
    other.write_text("keep me")
    code, _, err = cli(["register", fixed, moving, "-o", str(other), "--force", *FAST])
    _one_line_error(code, err)
    assert other.read_text() == "keep me"
    # -o below a file: refused before any registration runs
    code, _, err = cli(["register", fixed, moving, "-o", str(other / "out"), "--force", *FAST])
    _one_line_error(code, err)
    assert _md5s(inp) == before
    # apply: the output may not be its own input
    code, _, err = cli(["apply", moving, "-r", fixed, "-t", str(inp / "landmarks.csv"),
                        "-o", moving, "--force"])
    _one_line_error(code, err)
    assert _md5s(inp) == before


def test_dot_as_output_folder(inp, cli, monkeypatch):
    monkeypatch.chdir(inp)
    before = _md5s(inp)
    code, _, err = cli(["register", "fixed.nii.gz", "moving.nii.gz", "-o", ".", *FAST])
    _one_line_error(code, err)  # not empty: --force is needed ...
    assert "--force" in err
    code, _, err = cli(["register", "fixed.nii.gz", "moving.nii.gz", "-o", ".", "--force",
                        "-t", "translation", *FAST])
    assert code == 0, err  # ... and then only itreg's files are added
    assert {k: _md5s(inp)[k] for k in before} == before
    assert (inp / "warped.nii.gz").is_file()


@pytest.mark.parametrize("sig, code, word", [(signal.SIGTERM, 143, "terminated"),
                                             (signal.SIGINT, 130, "interrupted")])
def test_a_signal_mid_run_leaves_no_partial_output(inp, tmp_path, sig, code, word):
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "itreg.cli", "register", str(inp / "fixed.nii.gz"),
         str(inp / "moving.nii.gz"), "-o", str(out), "-t", "bspline", "--set",
         "stages.2.iterations=100000", "--set", "convergence.tolerance=0"],
        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    # off a terminal the engine prints one line per level: the first one shows that the
    # registration runs (100000 iterations take minutes), then it is interrupted
    line = proc.stderr.readline()
    assert "stage 1" in line, line
    assert proc.poll() is None, "the registration ended before the signal"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert f"itreg: {word}" in err and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".itreg")]


# ------------------------------------------------------------------ one-line errors

@pytest.mark.parametrize("args, words", [
    (["register", "F", "M", "-o", "o", "--threads", "0"], "--threads"),
    (["register", "F", "M", "-o", "o", "--seed", "abc"], "--seed"),
    (["register", "F", "M", "-o", "o", "--seed", "99999999999999999999"], "--seed"),
    (["register", "F", "M", "-o", "o", "--device", "foo"], "device"),
    (["register", "F", "M", "-o", "o", "--device", "cuda:7"], "cuda:7"),
    (["register", "F", "M", "-o", "o", "--set", "iterations=1e30"], "100000"),
    (["phantom", "-o", "p", "--n", "1"], "--n"),
    (["groupwise", "-o", "g"], "IMAGES"),
    (["register", "F"], "MOVING"),
    (["no-such-command"], "no-such-command"),
    (["landscape", "F", "M", "-o", "l", "--plateau-tol", "nan"], "plateau"),
    (["presets", "show", "nosuch"], "affine"),
])
def test_usage_and_setting_errors_are_one_line(inp, tmp_path, cli, monkeypatch, args, words):
    monkeypatch.chdir(tmp_path)
    args = [str(inp / "fixed.nii.gz") if a == "F" else str(inp / "moving.nii.gz") if a == "M"
            else a for a in args]
    code, _, err = cli(args)
    _one_line_error(code, err)
    assert words in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["inp"]


def test_verbose_anywhere_and_a_log_file(inp, tmp_path, cli):
    log = tmp_path / "run.log"
    code, _, err = cli(["register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"),
                        "-o", str(tmp_path / "o"), "-t", "translation", *FAST, "-v",
                        "--log", str(log)])
    assert code == 0, err
    text = log.read_text()
    assert text and all(line[:4].isdigit() for line in text.splitlines())  # timestamped


def test_thin_images_absent_labels_and_empty_models_are_refused(inp, tmp_path, cli):
    thin = sitk.GetImageFromArray(np.random.default_rng(0).random((1, 20, 20)).astype(
        np.float32))
    sitk.WriteImage(thin, str(tmp_path / "thin.nii.gz"))
    sitk.WriteImage(thin, str(tmp_path / "thin2.nii.gz"))
    code, _, err = cli(["register", str(tmp_path / "thin.nii.gz"),
                        str(tmp_path / "thin2.nii.gz"), "-o", str(tmp_path / "o"), *FAST])
    _one_line_error(code, err)
    assert "too thin" in err and "z (1 voxel)" in err
    labels = sitk.Cast(blob_image() > 0.05, sitk.sitkUInt8)
    sitk.WriteImage(labels, str(tmp_path / "lab.nii.gz"))
    code, _, err = cli(["evaluate", "--fixed-labels", str(tmp_path / "lab.nii.gz"),
                        "--warped-labels", str(tmp_path / "lab.nii.gz"), "--labels", "99"])
    _one_line_error(code, err)
    assert "99" in err and "present: 1" in err
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    code, _, err = cli(["register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"),
                        "--net", str(empty), "-o", str(tmp_path / "n")])
    _one_line_error(code, err)
    assert "empty" in err


# ------------------------------------------------------------------ inputs and packaging

def _write_dicom_series(image: sitk.Image, folder: Path) -> None:
    folder.mkdir()
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    uid = "1.2.826.0.1.3680043.2.1125.4242"
    for z in range(image.GetDepth()):
        sl = image[:, :, z]
        sl.SetMetaData("0020|000e", uid + ".1")
        sl.SetMetaData("0020|000d", uid)
        sl.SetMetaData("0008|0060", "MR")
        position = image.TransformIndexToPhysicalPoint((0, 0, z))
        sl.SetMetaData("0020|0032", "\\".join(f"{v:.6f}" for v in position))
        sl.SetMetaData("0020|0037", "1\\0\\0\\0\\1\\0")
        sl.SetMetaData("0020|0013", str(z))
        writer.SetFileName(str(folder / f"slice{z:03d}.dcm"))
        writer.Execute(sl)


def _blob3d(shift=(0.0, 0.0, 0.0), remap=False) -> sitk.Image:
    z, y, x = np.mgrid[:16, :32, :32].astype(np.float64) * 2.0
    x, y, z = x - shift[0], y - shift[1], z - shift[2]
    img = np.exp(-((x - 30) ** 2 + (y - 32) ** 2 + (z - 16) ** 2) / (2 * 9.0 ** 2))
    img += 0.5 * np.exp(-((x - 22) ** 2 + (y - 38) ** 2 + (z - 12) ** 2) / (2 * 4.0 ** 2))
    if remap:
        img = np.exp(-2 * img)
    out = sitk.GetImageFromArray((img * 1000).astype(np.int16))
    out.SetSpacing((2.0, 2.0, 2.0))
    out.SetOrigin((-10.0, 5.0, 3.0))
    return out


def test_a_dicom_series_folder_registers(tmp_path, cli):
    from itreg import io

    fixed = _blob3d()
    _write_dicom_series(fixed, tmp_path / "dicom")
    read = io.read_image(tmp_path / "dicom")
    assert read.grid.size == (32, 32, 16)
    assert np.allclose(read.grid.origin, (-10.0, 5.0, 3.0), atol=1e-4)
    assert np.allclose(read.grid.spacing, (2.0, 2.0, 2.0), atol=1e-4)
    np.testing.assert_array_equal(read.data[0].numpy(), sitk.GetArrayFromImage(fixed))
    sitk.WriteImage(_blob3d(shift=(2.0, 0.0, 0.0), remap=True), str(tmp_path / "m.nii.gz"))
    code, _, err = cli(["register", str(tmp_path / "dicom"), str(tmp_path / "m.nii.gz"), "-o",
                        str(tmp_path / "out"), "-t", "translation", *FAST])
    assert code == 0, err
    tx = sitk.ReadTransform(str(tmp_path / "out" / "transform.tfm"))
    assert abs(tx.TransformPoint((0.0, 0.0, 0.0))[0] - 2.0) < 0.5
    empty = tmp_path / "nodicom"
    empty.mkdir()
    code, _, err = cli(["register", str(empty), str(tmp_path / "m.nii.gz"), "-o",
                        str(tmp_path / "o2"), *FAST])
    _one_line_error(code, err)
    assert "no DICOM series" in err


def test_reports_record_versions_and_the_command_line(inp, tmp_path, cli):
    import json

    import torch

    import itreg

    out = tmp_path / "o"
    code, _, err = cli(["register", str(inp / "fixed.nii.gz"), str(inp / "moving.nii.gz"),
                        "-o", str(out), "-t", "translation", *FAST])
    assert code == 0, err
    prov = json.loads((out / "report.json").read_text())["provenance"]
    assert prov["itreg"] == itreg.__version__ and prov["torch"] == torch.__version__
    assert prov["SimpleITK"] == sitk.Version.VersionString() and "command" in prov


def test_packaging_files_exist():
    root = Path(__file__).resolve().parents[1]
    assert (root / "LICENSE").read_text().startswith(" " * 10) or \
        "Apache License" in (root / "LICENSE").read_text()
    assert (root / "src" / "itreg" / "py.typed").exists()
    import itreg
    from itreg._version import __version__

    assert itreg.__version__ == __version__


def test_help_and_a_usage_error_start_without_torch():
    code = ("import sys\nfrom itreg.cli import main\n"
            "try:\n    main(['register', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('torch' in sys.modules, 'SimpleITK' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True, env={**os.environ, "COLUMNS": "100"})
    assert proc.stdout.strip().splitlines()[-1] == "False False"


def test_a_truncated_reference_is_refused(inp, tmp_path, cli):
    data = (inp / "fixed.nii.gz").read_bytes()
    truncated = tmp_path / "truncated.nii.gz"
    truncated.write_bytes(data[: len(data) // 2])
    out = tmp_path / "applied.nii.gz"
    sitk.WriteTransform(sitk.Euler2DTransform(), str(tmp_path / "identity.tfm"))
    code, _, err = cli(["apply", str(inp / "moving.nii.gz"), "-r", str(truncated), "-t",
                        str(tmp_path / "identity.tfm"), "-o", str(out)])
    _one_line_error(code, err)
    assert "truncated" in err and not out.exists()
    from itreg import io

    with pytest.raises(Exception, match="truncated"):
        io.read_header(truncated)


def test_model_files_record_provenance(tmp_path):
    import torch

    import itreg
    from itreg.blocks.modelfile import save_model

    path = save_model(tmp_path / "m.pt", "test-kind", {"a": 1}, {"w": torch.zeros(2)})
    payload = torch.load(path, weights_only=True)
    assert payload["provenance"]["itreg"] == itreg.__version__
    assert payload["provenance"]["torch"] == torch.__version__


def test_training_progress_off_a_terminal_is_plain_lines(capsys):
    from itreg.train import progress_bar

    with progress_bar(True, "epochs", 3) as bar:
        for _ in range(3):
            bar.update(advance=1, loss=0.5)
    err = capsys.readouterr().err
    assert "epochs: 3/3 loss=0.5" in err and "\x1b[" not in err


def test_wildly_different_voxel_sizes_are_warned_about(caplog):
    import logging

    import torch

    from itreg.api import prepare_inputs
    from itreg.grid import Grid
    from itreg.image import Image

    data = torch.rand(1, 8, 16, 16)
    fixed = Image(data, Grid((16, 16, 8), spacing=(0.01, 0.01, 0.01)))
    moving = Image(data.clone(), Grid((16, 16, 8), spacing=(10.0, 10.0, 10.0)))
    with caplog.at_level(logging.WARNING, logger="itreg"):
        prepare_inputs(fixed, moving)
    assert "differ by a factor of 1e+03" in caplog.text and "between the images" in caplog.text


def test_one_name_per_transform_across_commands():
    from itreg.api import resolve_config

    assert resolve_config("ffd").to_dict() == resolve_config("bspline").to_dict()
    from itreg.cli.groupwise import _TRANSFORM_ALIASES

    assert _TRANSFORM_ALIASES["bspline"] == "ffd"


def test_multi_file_options_take_globs_and_repeats(tmp_path):
    from itreg.cli.app import expand_paths
    from itreg.errors import ConfigError

    for name in ("t1_01.nii.gz", "t1_02.nii.gz", "t2_01.nii.gz"):
        (tmp_path / name).write_bytes(b"")
    got = expand_paths([str(tmp_path / "t1_*.nii.gz"), str(tmp_path / "t2_01.nii.gz")], "x")
    assert [p.name for p in got] == ["t1_01.nii.gz", "t1_02.nii.gz", "t2_01.nii.gz"]
    got = expand_paths([f"{tmp_path / 't1_01.nii.gz'},{tmp_path / 't2_01.nii.gz'}"], "x")
    assert [p.name for p in got] == ["t1_01.nii.gz", "t2_01.nii.gz"]
    with pytest.raises(ConfigError, match="matches no file"):
        expand_paths([str(tmp_path / "nothing_*.nii.gz")], "--images")


def test_ctrl_c_during_start_up_imports_is_one_line():
    code = (
        "import sys\n"
        "class Interrupt:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'itreg.cli':\n"
        "            raise KeyboardInterrupt\n"
        "sys.meta_path.insert(0, Interrupt())\n"
        "from itreg._entry import main\n"
        "main(['--help'])\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 130
    assert proc.stderr == "itreg: interrupted\n"


def test_command_progress_off_a_terminal_is_plain_lines(capsys):
    from itreg.cli.app import progress_callback

    with progress_callback("landscape", True) as cb:
        for done in range(1, 4):
            cb(done, 3)
    err = capsys.readouterr().err
    assert "landscape: 1/3 (" in err and "landscape: 3/3 (" in err and "\x1b[" not in err
    with progress_callback("landscape", False) as cb:
        assert cb is None
