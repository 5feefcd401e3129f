"""Device presets (crossbar_torch/presets/devices/*.yaml, package data) and the write-cost /
endurance functions.

Expected values are recomputed here from the raw YAML or written out as hand arithmetic; none is
copied from crossbar_torch/device.py.
"""
import math
import os
import re
from pathlib import Path

import pytest
import yaml

from crossbar_torch.device import (DEVICE_DIR, Device, known_devices, load_device,
                                   passes_until, write_cost)

REPO = Path(__file__).resolve().parents[1]
PRESET_DIR = REPO / "crossbar_torch" / "presets" / "devices"
PRESETS = ("default", "fefet", "pcm", "rram")
FLOAT_KEYS = ("endurance", "set_energy_j", "reset_energy_j", "set_pulse_s", "reset_pulse_s",
              "read_energy_j")
NUMERIC_KEYS = FLOAT_KEYS + ("write_parallel_crossbars",)
ALL_KEYS = ("name", "description") + NUMERIC_KEYS


def raw(name):
    """A preset as plain YAML, numbers taken as numbers (PyYAML reads '1.0e6' as a string)."""
    data = yaml.safe_load((PRESET_DIR / f"{name}.yaml").read_text())
    return {k: (float(v) if k in FLOAT_KEYS else v) for k, v in data.items()}


# A round-number device for the arithmetic tests, written as a YAML file.
ROUND = {"endurance": "1000.0", "set_energy_j": "2.0e-12", "reset_energy_j": "3.0e-12",
         "set_pulse_s": "10.0e-9", "reset_pulse_s": "20.0e-9", "read_energy_j": "1.0e-10",
         "write_parallel_crossbars": "4"}


def write_yaml(directory, stem="tdev", suffix=".yaml", **values):
    """A device YAML at ``directory/stem.suffix``: ROUND plus ``values`` (raw YAML text; a value
    of None drops the key)."""
    fields = {"name": stem, "description": "test device", **ROUND, **values}
    text = "".join(f"{k}: {v}\n" for k, v in fields.items() if v is not None)
    path = Path(directory) / f"{stem}{suffix}"
    path.write_text(text)
    return path


def round_device(tmp_path, **values):
    return load_device(str(write_yaml(tmp_path, **values)))


# --------------------------------------------------------------------------- presets


def test_device_dir_is_the_package_data_folder():
    # The presets live inside the package (an installed wheel has no checkout around it), and
    # pyproject.toml ships them; scripts/check_wheel.sh loads them from a built wheel.
    assert DEVICE_DIR == PRESET_DIR
    assert not (REPO / "configs" / "devices" / "default.yaml").exists()
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "presets/devices/*.yaml" in data["tool"]["setuptools"]["package-data"]["crossbar_torch"]


def test_known_devices_are_the_sorted_yaml_stems():
    stems = sorted(f[:-len(".yaml")] for f in os.listdir(PRESET_DIR) if f.endswith(".yaml"))
    assert known_devices() == stems
    assert set(PRESETS) <= set(stems)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads_validates_and_matches_its_yaml(name):
    data = raw(name)
    assert sorted(data) == sorted(ALL_KEYS), "a preset holds exactly the documented keys"
    assert data["name"] == name
    dev = load_device(name)
    assert isinstance(dev, Device)
    assert dev.name == name and dev.description == data["description"] and dev.description
    assert dev.source == str((PRESET_DIR / f"{name}.yaml").resolve())
    for key in FLOAT_KEYS:
        assert isinstance(getattr(dev, key), float)
        assert getattr(dev, key) == data[key]
        assert math.isfinite(data[key]) and data[key] > 0
    w = data["write_parallel_crossbars"]
    assert isinstance(w, int) and not isinstance(w, bool) and w >= 1
    assert dev.write_parallel_crossbars == w
    assert dev.to_dict() == {**data, "source": dev.source}
    # Loading by path gives the same device.
    assert load_device(str(PRESET_DIR / f"{name}.yaml")) == dev


@pytest.mark.parametrize("name", PRESETS)
def test_every_numeric_line_cites_its_source(name):
    text = (PRESET_DIR / f"{name}.yaml").read_text()
    seen = set()
    for line in text.splitlines():
        m = re.match(r"^(\w+)\s*:\s*([^#]*?)\s*(#\s*(.*))?$", line)
        if not m or m.group(1) not in NUMERIC_KEYS:
            continue
        seen.add(m.group(1))
        comment = m.group(4) or ""
        assert len(comment.strip()) >= 20, f"{name}.yaml: {m.group(1)} has no source comment"
    assert seen == set(NUMERIC_KEYS)


def test_preset_derivations_in_comments_hold():
    """The arithmetic the comments show, redone here (V^2 * G * t; V * I * t; C * V^2;
    N * Vr^2 * G * t for a 128x128 tile)."""
    rram, pcm, fefet = raw("rram"), raw("pcm"), raw("fefet")
    g_on, g_off = 1 / 100e3, 1 / 1e6
    assert rram["set_energy_j"] == pytest.approx(4**2 * (g_on + g_off) / 2 * 50e-9, rel=1e-9)
    assert rram["reset_energy_j"] == rram["set_energy_j"]
    assert rram["read_energy_j"] == pytest.approx(128 * 128 * 0.5**2 * g_on * 10e-9, rel=1e-9)
    assert pcm["set_energy_j"] == pytest.approx(1.0 * 100e-6 * 150e-9, rel=1e-9)
    assert pcm["reset_energy_j"] == pytest.approx(1.5 * 200e-6 * 50e-9, rel=1e-9)
    assert pcm["read_energy_j"] == pytest.approx(128 * 128 * 0.2**2 * 1e-4 * 10e-9, rel=1e-9)
    assert fefet["set_energy_j"] == pytest.approx(2.1717e-18 * 4**2, rel=1e-4)
    assert fefet["read_energy_j"] == rram["read_energy_j"]


def test_default_is_the_elementwise_worst_of_the_technology_presets():
    techs = [raw(n) for n in ("rram", "pcm", "fefet")]
    default = raw("default")
    assert default["endurance"] == min(t["endurance"] for t in techs)
    for key in ("set_energy_j", "reset_energy_j", "set_pulse_s", "reset_pulse_s",
                "read_energy_j"):
        assert default[key] == max(t[key] for t in techs), key
    assert default["write_parallel_crossbars"] == min(t["write_parallel_crossbars"]
                                                      for t in techs)


def test_unknown_name_lists_every_known_device():
    with pytest.raises(ValueError) as e:
        load_device("x")
    assert str(e.value) == ("unknown device 'x'; known: default, fefet, pcm, rram "
                            "(or a path to a device YAML)")


# --------------------------------------------------------------------------- bad YAML


@pytest.mark.parametrize("value", ["0", "0.0", "-1", ".nan", ".inf", "-.inf", "true", "false",
                                   "abc", "[1, 2]", "null"])
def test_bad_endurance_is_refused_naming_the_field(tmp_path, value):
    path = write_yaml(tmp_path, endurance=value)
    with pytest.raises(ValueError, match="endurance") as e:
        load_device(str(path))
    assert str(path) in str(e.value)


@pytest.mark.parametrize("field", [k for k in FLOAT_KEYS if k != "endurance"])
@pytest.mark.parametrize("value", ["0", "-2.0e-12", ".nan", "true"])
def test_bad_energy_or_time_is_refused_naming_the_field(tmp_path, field, value):
    with pytest.raises(ValueError, match=f"{field}=.*is invalid"):
        round_device(tmp_path, **{field: value})


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "true", "two"])
def test_bad_write_parallel_crossbars_is_refused(tmp_path, value):
    with pytest.raises(ValueError, match="write_parallel_crossbars"):
        round_device(tmp_path, write_parallel_crossbars=value)


def test_unknown_key_is_refused_listing_the_known_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown key.*endurance_cycles") as e:
        round_device(tmp_path, endurance_cycles="5")
    for key in ALL_KEYS:
        assert key in str(e.value)


@pytest.mark.parametrize("key", ALL_KEYS)
def test_missing_key_is_refused_naming_it(tmp_path, key):
    with pytest.raises(ValueError, match=f"missing key.*{key}"):
        round_device(tmp_path, **{key: None})


@pytest.mark.parametrize("text", ["- 1\n- 2\n", "just a string\n", ""])
def test_a_yaml_that_is_not_a_mapping_is_refused(tmp_path, text):
    path = tmp_path / "tdev.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match="mapping") as e:
        load_device(str(path))
    assert str(path) in str(e.value)


def test_name_must_equal_the_file_stem(tmp_path):
    with pytest.raises(ValueError, match="'other'.*'tdev'"):
        round_device(tmp_path, name="other")


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "tdev.yaml"
    path.write_text("name: tdev\nendurance: [1,\n")
    with pytest.raises(ValueError, match=re.escape(str(path)) + r":\d+:\d+: YAML syntax"):
        load_device(str(path))


def test_missing_file_and_directory_are_refused(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_device(str(tmp_path / "nope.yaml"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ValueError, match="not a file"):
        load_device(str(tmp_path / "dir.yaml"))


# --------------------------------------------------------------------------- path loading


def test_path_loading(tmp_path, monkeypatch):
    path = write_yaml(tmp_path)
    dev = load_device(str(path))
    assert dev.name == "tdev" and dev.source == str(path.resolve())
    assert (dev.set_energy_j, dev.reset_energy_j) == (2e-12, 3e-12)
    assert (dev.set_pulse_s, dev.reset_pulse_s) == (10e-9, 20e-9)
    assert dev.endurance == 1000.0 and dev.write_parallel_crossbars == 4
    assert load_device(path) == dev  # a Path object too
    yml = write_yaml(tmp_path, stem="ydev", suffix=".yml")
    assert load_device(str(yml)).name == "ydev"
    monkeypatch.chdir(tmp_path)
    assert load_device("tdev.yaml") == dev  # relative, recognised by its extension


def test_numbers_yaml_1_1_reads_as_strings_are_taken_as_numbers(tmp_path):
    assert yaml.safe_load("x: 1e6")["x"] == "1e6"  # why the loader converts
    dev = round_device(tmp_path, endurance="1e6", set_energy_j="2e-12")
    assert dev.endurance == 1e6 and dev.set_energy_j == 2e-12


def test_an_edited_file_is_read_again(tmp_path):
    path = write_yaml(tmp_path)
    first = load_device(str(path))
    assert load_device(str(path)) is first  # cached
    write_yaml(tmp_path, endurance="123456.0")
    assert load_device(str(path)).endurance == 123456.0


# --------------------------------------------------------------------------- Device in code


def test_device_built_in_code():
    kw = dict(name="d", description="", endurance=10, set_energy_j=1e-12, reset_energy_j=1e-12,
              set_pulse_s=1e-9, reset_pulse_s=1e-9, read_energy_j=1e-12,
              write_parallel_crossbars=2)
    dev = Device(**kw)
    assert dev.source == "" and dev.endurance == 10.0 and isinstance(dev.endurance, float)
    assert Device(**dev.to_dict()) == dev
    with pytest.raises(ValueError, match=r"device 'd': endurance=True is invalid: "
                                         r"must be a positive finite number"):
        Device(**{**kw, "endurance": True})
    with pytest.raises(ValueError, match="read_energy_j=inf"):
        Device(**{**kw, "read_energy_j": math.inf})
    with pytest.raises(ValueError, match="write_parallel_crossbars=2.0"):
        Device(**{**kw, "write_parallel_crossbars": 2.0})
    with pytest.raises(ValueError, match="name"):
        Device(**{**kw, "name": ""})


# --------------------------------------------------------------------------- write_cost


def test_write_cost_by_hand(tmp_path):
    dev = round_device(tmp_path)  # SET 2 pJ / 10 ns, RESET 3 pJ / 20 ns, 4 crossbars at once
    c = write_cost(set_pulses=100, reset_pulses=50, rows_programmed=40, pool=8,
                   bits_per_cell=1, device=dev)
    assert c["set_energy_j"] == pytest.approx(100 * 2e-12, rel=1e-12)      # 2.0e-10 J
    assert c["reset_energy_j"] == pytest.approx(50 * 3e-12, rel=1e-12)     # 1.5e-10 J
    assert c["write_energy_j"] == pytest.approx(3.5e-10, rel=1e-12)
    assert c["row_write_time_s"] == pytest.approx(1 * (10e-9 + 20e-9), rel=1e-12)  # 30 ns
    assert c["parallel_crossbars"] == 4                                      # min(4, pool 8)
    assert c["write_time_s"] == pytest.approx(40 * 30e-9 / 4, rel=1e-12)    # 300 ns
    assert set(c) == {"set_energy_j", "reset_energy_j", "write_energy_j", "row_write_time_s",
                      "parallel_crossbars", "write_time_s"}


def test_write_cost_pool_smaller_than_parallel_writers(tmp_path):
    dev = round_device(tmp_path)
    c = write_cost(100, 50, 40, pool=2, bits_per_cell=1, device=dev)
    assert c["parallel_crossbars"] == 2                                      # min(4, pool 2)
    assert c["write_time_s"] == pytest.approx(40 * 30e-9 / 2, rel=1e-12)    # 600 ns
    assert c["write_energy_j"] == pytest.approx(100 * 2e-12 + 50 * 3e-12, rel=1e-12)
    one = write_cost(100, 50, 40, pool=1, bits_per_cell=1, device=dev)
    assert one["parallel_crossbars"] == 1
    assert one["write_time_s"] == pytest.approx(40 * 30e-9, rel=1e-12)     # 1.2 us


def test_write_cost_two_bit_cells(tmp_path):
    dev = round_device(tmp_path)
    c = write_cost(100, 50, 40, pool=8, bits_per_cell=2, device=dev)
    # a 2-bit cell may need 3 one-level steps: the row slot is 3 * (10 + 20) ns = 90 ns
    assert c["row_write_time_s"] == pytest.approx(3 * 30e-9, rel=1e-12)
    assert c["write_time_s"] == pytest.approx(40 * 90e-9 / 4, rel=1e-12)   # 900 ns
    # pulses are already level steps: the energy does not depend on bits_per_cell
    assert c["write_energy_j"] == pytest.approx(3.5e-10, rel=1e-12)
    eight = write_cost(0, 0, 1, pool=8, bits_per_cell=8, device=dev)
    assert eight["row_write_time_s"] == pytest.approx(255 * 30e-9, rel=1e-12)


def test_write_cost_nothing_written(tmp_path):
    c = write_cost(0, 0, 0, pool=3, bits_per_cell=1, device=round_device(tmp_path))
    assert (c["write_energy_j"], c["write_time_s"]) == (0.0, 0.0)
    assert c["parallel_crossbars"] == 3


@pytest.mark.parametrize("preset", PRESETS)
def test_write_cost_on_presets_follows_their_yaml(preset):
    data = raw(preset)
    c = write_cost(7, 5, 11, pool=16, bits_per_cell=3, device=load_device(preset))
    assert c["write_energy_j"] == pytest.approx(7 * data["set_energy_j"]
                                                + 5 * data["reset_energy_j"], rel=1e-12)
    slot = 7 * (data["set_pulse_s"] + data["reset_pulse_s"])
    par = min(data["write_parallel_crossbars"], 16)
    assert c["write_time_s"] == pytest.approx(11 * slot / par, rel=1e-12)


@pytest.mark.parametrize("arg,value", [
    ("set_pulses", -1), ("reset_pulses", -1), ("rows_programmed", -1), ("set_pulses", -0.5),
    ("set_pulses", float("nan")), ("reset_pulses", float("inf")), ("reset_pulses", True), ("pool", 0), ("pool", -2), ("bits_per_cell", 0),
    ("bits_per_cell", 9), ("rows_programmed", "3")])
def test_write_cost_refuses_bad_input_naming_it(tmp_path, arg, value):
    kw = dict(set_pulses=1, reset_pulses=1, rows_programmed=1, pool=1, bits_per_cell=1,
              device=round_device(tmp_path))
    with pytest.raises(ValueError, match=arg):
        write_cost(**{**kw, arg: value})


def test_write_cost_takes_period_averages(tmp_path):
    """A wear-levelling period reports counts per pass as averages (rule 14)."""
    dev = round_device(tmp_path)
    one = write_cost(3, 1, 2, pool=1, bits_per_cell=1, device=dev)
    avg = write_cost(1.5, 0.5, 1.0, pool=1, bits_per_cell=1, device=dev)
    for k in ("set_energy_j", "reset_energy_j", "write_energy_j", "write_time_s"):
        assert avg[k] == pytest.approx(one[k] / 2, rel=1e-12)


def test_write_cost_needs_a_device():
    with pytest.raises(TypeError, match="Device"):
        write_cost(1, 1, 1, 1, 1, device="rram")


# --------------------------------------------------------------------------- passes_until


def test_passes_until_edges():
    assert passes_until(1e6, 0) is None            # never written: never wears
    assert passes_until(1e6, 0.0) is None
    assert passes_until(10, 5) == 2                # exact: the 2nd pass brings it to 10
    assert passes_until(10, 3) == 4                # 3, 6, 9, 12: reached during pass 4
    assert passes_until(10, 10) == 1
    assert passes_until(10, 25) == 1               # more writes than endurance in one pass
    assert passes_until(1e6, 3) == 333334          # 333333 passes take 999999 writes
    assert passes_until(1e5, 0.5) == 200000        # fractional average writes per pass
    assert isinstance(passes_until(1e6, 7), int)


def test_passes_until_is_exact():
    big = 2**53 + 1                                # not a float: float division rounds it away
    assert passes_until(big, 1) == big
    assert passes_until(big, 2) == -(-big // 2)    # integer ceiling


@pytest.mark.parametrize("endurance,writes,match", [
    (0, 1, "endurance"), (-5, 1, "endurance"), (math.nan, 1, "endurance"),
    (True, 1, "endurance"), (10, -1, "writes_per_pass"), (10, math.inf, "writes_per_pass"),
    (10, math.nan, "writes_per_pass")])
def test_passes_until_refuses_bad_input(endurance, writes, match):
    with pytest.raises(ValueError, match=match):
        passes_until(endurance, writes)
