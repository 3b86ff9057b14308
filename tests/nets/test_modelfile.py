"""Model-file format: round trip, refusal of foreign/truncated/other-version files."""

from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

from itreg.blocks.modelfile import (
    build_model,
    load_model,
    register_model_kind,
    save_model,
)
from itreg.errors import ConfigError, ModelFileError, OutputExistsError


class _Tiny(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.lin = nn.Linear(3, width)


def _build_tiny(config):
    return _Tiny(int(config["width"]))


register_model_kind("test-tiny", _build_tiny, overwrite=True)


def _saved(tmp_path, **kw):
    torch.manual_seed(0)
    net = _Tiny(4)
    path = tmp_path / "m.pt"
    save_model(path, "test-tiny", {"width": 4}, net.state_dict(), {"epochs": 3}, **kw)
    return net, path


def test_round_trip_and_build(tmp_path):
    net, path = _saved(tmp_path)
    kind, config, state, extra = load_model(path, expected_kind="test-tiny")
    assert kind == "test-tiny" and config == {"width": 4} and extra == {"epochs": 3}
    for k, v in net.state_dict().items():
        assert torch.equal(state[k], v)
    rebuilt, extra2 = build_model(path)
    assert extra2 == {"epochs": 3}
    x = torch.randn(5, 3)
    assert torch.equal(rebuilt.lin(x), net.lin(x))
    assert not rebuilt.training


def test_existing_file_needs_force(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(OutputExistsError):
        save_model(path, "test-tiny", {"width": 4}, _Tiny(4).state_dict())
    save_model(path, "test-tiny", {"width": 4}, _Tiny(4).state_dict(), force=True)


def test_truncated_file(tmp_path):
    _, path = _saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelFileError, match="m.pt"):
        load_model(path)


class _Evil:
    def __reduce__(self):
        return (exec, ("import sys; sys.modules['itreg']._PWNED = True",))


def test_foreign_pickle_is_not_unpickled(tmp_path):
    import itreg

    for name, obj in (("evil.pt", {"format": "itreg-model", "x": _Evil()}), ("obj.pt", _Evil())):
        path = tmp_path / name
        torch.save(obj, path)
        with pytest.raises(ModelFileError, match=name):
            load_model(path)
        assert not hasattr(itreg, "_PWNED")
    raw = tmp_path / "raw.pkl"
    raw.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(ModelFileError, match="raw.pkl"):
        load_model(raw)


def test_not_an_itreg_model(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ModelFileError, match="not an itreg model"):
        load_model(path)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_version_mismatch(tmp_path):
    path = tmp_path / "v2.pt"
    torch.save(
        {"format": "itreg-model", "version": 2, "kind": "test-tiny", "config": {},
         "state_dict": {}, "extra": {}},
        path,
    )
    with pytest.raises(ModelFileError, match="version 2"):
        load_model(path)


def test_wrong_kind_and_unknown_kind(tmp_path):
    _, path = _saved(tmp_path)
    with pytest.raises(ModelFileError, match="'ditr'"):
        load_model(path, expected_kind="ditr")
    other = tmp_path / "other.pt"
    save_model(other, "never-registered", {}, {})
    with pytest.raises(ModelFileError, match="never-registered"):
        build_model(other)


def test_weights_must_fit(tmp_path):
    path = tmp_path / "bad.pt"
    save_model(path, "test-tiny", {"width": 5}, _Tiny(4).state_dict())
    with pytest.raises(ModelFileError, match="do not fit"):
        build_model(path)


def test_config_must_be_plain(tmp_path):
    with pytest.raises(ConfigError):
        save_model(tmp_path / "x.pt", "test-tiny", {"f": object()}, {})
    assert not (tmp_path / "x.pt").exists()
