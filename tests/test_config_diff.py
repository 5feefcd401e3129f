"""CrossbarConfig.diff, a config that reads no file when it is built, and a checkpoint that
stores the device's values rather than its path (issue 17)."""
import os

import pytest
import torch
import torch.nn as nn

import crossbar_torch as xb
import crossbar_torch.device as device_mod
from crossbar_torch.device import Device, load_device
from crossbar_torch.apps.finetune import save_final

ROUND = ("name: tdev\ndescription: test device\nendurance: 1000.0\nset_energy_j: 2.0e-12\n"
         "reset_energy_j: 3.0e-12\nset_pulse_s: 1.0e-8\nreset_pulse_s: 2.0e-8\n"
         "read_energy_j: 1.0e-10\nwrite_parallel_crossbars: 4\n")


def test_diff_names_each_field_in_field_order():
    a = xb.CrossbarConfig(rows=64, sort="none")
    b = xb.CrossbarConfig(rows=32, sort="none", stuck_slices=2, reprogram_fraction=0.5)
    assert a.diff(b) == {"rows": (64, 32), "stuck_slices": (0, 2),
                         "reprogram_fraction": (1.0, 0.5)}
    assert b.diff(a) == {k: (t, m) for k, (m, t) in a.diff(b).items()}
    assert a.diff(b, ignore=("rows", "stuck_slices")) == {"reprogram_fraction": (1.0, 0.5)}
    assert a.diff(a) == {} and a.diff(a.to_dict()) == {}
    # a saved dict: missing fields hold their defaults, unknown keys are named
    assert xb.CrossbarConfig(rows=64).diff({"rows": 64, "cols": 64, "gone": 1}) == {
        "cols": (128, 64), "gone": (None, 1)}


def test_construction_reads_no_file(monkeypatch, tmp_path):
    def no_io(*a, **k):
        raise AssertionError("CrossbarConfig read a device file while being built")
    monkeypatch.setattr(device_mod, "_load_file", no_io)
    monkeypatch.setattr(device_mod, "known_devices", no_io)
    xb.CrossbarConfig(device="rram")
    cfg = xb.CrossbarConfig(device=str(tmp_path / "missing.yaml"))  # resolved when used
    monkeypatch.undo()
    with pytest.raises(xb.DeviceError, match="missing.yaml"):
        cfg.load_device()
    with pytest.raises(xb.ConfigError, match="device"):
        xb.CrossbarConfig(device="")


def test_a_device_given_by_values():
    rram = load_device("rram")
    cfg = xb.CrossbarConfig(device=rram.to_dict())
    assert isinstance(cfg.device, Device) and cfg.load_device() == rram
    assert xb.CrossbarConfig.from_dict(cfg.to_dict()) == cfg
    named = xb.CrossbarConfig(device="rram")
    assert named.diff(cfg) == {} and cfg.diff(named) == {}
    assert "device" in xb.CrossbarConfig(device="pcm").diff(cfg)
    with pytest.raises(xb.DeviceError, match="endurance"):
        xb.CrossbarConfig(device={**rram.to_dict(), "endurance": -1.0})
    with pytest.raises(xb.ConfigError, match="device"):
        xb.CrossbarConfig(device={**rram.to_dict(), "colour": "red"})


def test_a_checkpoint_stores_the_device_values_not_its_path(tmp_path, monkeypatch):
    yaml_dir = tmp_path / "devices"
    yaml_dir.mkdir()
    (yaml_dir / "tdev.yaml").write_text(ROUND)
    monkeypatch.chdir(tmp_path)
    cfg = xb.CrossbarConfig(rows=16, cols=16, device="devices/tdev.yaml")  # relative path
    model = xb.convert(nn.Sequential(nn.Linear(8, 4)), cfg)
    save_final(model, tmp_path / "final.pt", config=cfg)
    os.remove(yaml_dir / "tdev.yaml")
    monkeypatch.chdir("/")
    saved = torch.load(tmp_path / "final.pt", weights_only=True)["crossbar_config"]
    assert saved["device"]["name"] == "tdev" and saved["device"]["endurance"] == 1000.0
    assert saved["device"]["source"] == ""
    back = xb.CrossbarConfig.from_dict(saved)
    assert back.load_device().write_parallel_crossbars == 4
    assert back.diff(cfg, ignore=("device",)) == {}


def test_the_comparisons_use_diff():
    """convert and reprogram_report name the differing fields the same way."""
    model = xb.convert(nn.Sequential(nn.Linear(8, 4)), xb.CrossbarConfig(rows=16, cols=16))
    with pytest.raises(ValueError, match=r"\{'rows': \(16, 32\)\}"):
        xb.convert(model, xb.CrossbarConfig(rows=32, cols=16))
    with pytest.raises(ValueError, match=r"\{'rows': \(32, 16\)\}"):
        xb.reprogram_report(model, config=xb.CrossbarConfig(rows=32, cols=16))
    # the counting fields may differ: the device is the caller's to choose
    rep = xb.reprogram_report(model, config=xb.CrossbarConfig(rows=16, cols=16, device="pcm"))
    assert rep.device.name == "pcm"
