import pytest

import crossbar_torch as xb
from crossbar_torch.config import CrossbarConfig, load_config, parse_overrides


def test_defaults_follow_design():
    c = CrossbarConfig()
    assert (c.rows, c.cols, c.weight_bits, c.bits_per_cell) == (128, 128, 8, 1)
    assert (c.encoding, c.quant, c.sort, c.sort_scope) == ("differential", "per_channel",
                                                           "magnitude", "filter")
    assert (c.stuck_slices, c.reprogram_fraction, c.stuck_value, c.pool, c.seed) == (
        0, 1.0, "initial", 1, 0)
    # differential 8 bits, 1 bit per cell: 7 magnitude slices per array, 14 cells, 9 filters
    assert (c.slices, c.cells_per_weight, c.filters_per_crossbar) == (7, 14, 9)
    assert not c.stucking


@pytest.mark.parametrize("enc,B,b,S,cells", [
    ("differential", 8, 2, 4, 8), ("twos_complement", 8, 1, 8, 8), ("offset", 8, 3, 3, 3),
    ("differential", 16, 4, 4, 8), ("twos_complement", 5, 2, 3, 3)])
def test_derived_slices(enc, B, b, S, cells):
    c = CrossbarConfig(encoding=enc, weight_bits=B, bits_per_cell=b)
    assert c.slices == S and c.cells_per_weight == cells


@pytest.mark.parametrize("field,value,match", [
    ("rows", 0, "rows"), ("cols", -1, "cols"), ("weight_bits", 1, "weight_bits"),
    ("weight_bits", 17, "weight_bits"), ("bits_per_cell", 0, "bits_per_cell"),
    ("reprogram_fraction", 1.5, "reprogram_fraction"), ("reprogram_fraction", -0.1,
                                                        "reprogram_fraction"),
    ("encoding", "gray", "encoding"), ("sort", "random", "sort"), ("quant", "per_row", "quant"),
    ("stuck_value", 2, "stuck_value"), ("pool", 0, "pool"), ("stuck_slices", 8, "stuck_slices"),
    ("cols", 13, "cols"), ("rows", 2.5, "rows"), ("sort_scope", "layer", "sort_scope")])
def test_bad_values_name_the_field(field, value, match):
    with pytest.raises(ValueError, match=match) as e:
        CrossbarConfig(**{field: value})
    assert repr(value) in str(e.value) or str(value) in str(e.value)


def test_bits_per_cell_wider_than_the_word():
    with pytest.raises(ValueError, match="bits_per_cell"):
        CrossbarConfig(weight_bits=3, bits_per_cell=4)


def test_frozen():
    with pytest.raises(Exception):
        CrossbarConfig().rows = 3


def test_yaml_round_trip(tmp_path):
    c = CrossbarConfig(rows=64, stuck_slices=3, reprogram_fraction=0.25, stuck_value=1,
                       encoding="offset")
    p = tmp_path / "c.yaml"
    c.to_yaml(p)
    assert CrossbarConfig.from_yaml(p) == c
    assert load_config(str(p), ["rows=32", "sort=value"]) == c.replace(rows=32, sort="value")


def test_overrides_errors(tmp_path):
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["rows"])
    with pytest.raises(ValueError, match="unknown field 'row'"):
        parse_overrides(["row=3"])
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(str(tmp_path / "nope.yaml"))
    (tmp_path / "bad.yaml").write_text("rows: 1\ncolumns: 3\n")
    with pytest.raises(ValueError, match="columns"):
        load_config(str(tmp_path / "bad.yaml"))


def test_baseline_config():
    c = CrossbarConfig(sort="value", stuck_slices=2, reprogram_fraction=0.5, pool=4)
    b = c.baseline()
    assert b.sort == "none" and not b.stucking and b.pool == 4


def test_shipped_configs_load():
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    paths = sorted(glob.glob(os.path.join(root, "configs", "*.yaml")))
    assert len(paths) >= 3
    for p in paths:
        if os.path.basename(p).startswith("sweep"):
            continue  # sweep files list runs; tests/test_scripts.py loads them
        if os.path.basename(p).startswith("allocate_"):  # crossbar-allocate --candidates
            import yaml
            from crossbar_torch.config import OVERRIDE_FIELDS
            with open(p) as f:
                candidates = yaml.safe_load(f)
            assert isinstance(candidates, list) and candidates
            for c in candidates:
                assert set(c) <= set(OVERRIDE_FIELDS)
                CrossbarConfig(sort="value", filter_order="chain").replace(**c)
            continue
        assert isinstance(xb.CrossbarConfig.from_yaml(p), CrossbarConfig)


def test_numeric_override_forms():
    assert parse_overrides(["reprogram_fraction=1e-1", "rows=64", "sort=value",
                            "stuck_value=initial"]) == {
        "reprogram_fraction": 0.1, "rows": 64, "sort": "value", "stuck_value": "initial"}


def test_crossbar_section_beside_top_level_fields_is_refused(tmp_path):
    """Issue 20 defect 8: a 'crossbar:' section silently dropped the other top-level keys."""
    p = tmp_path / "mixed.yaml"
    p.write_text("crossbar: {rows: 64}\nadc_bits: 6\nsort: value\n")
    for load in (CrossbarConfig.from_yaml, load_config):
        with pytest.raises(ValueError, match=r"mixed.yaml: has a 'crossbar:' section and "
                                             r"top-level key\(s\) \['adc_bits', 'sort'\]"):
            load(str(p))
    # a section alone still works, and means the same as the fields at the top level
    (tmp_path / "section.yaml").write_text("crossbar: {rows: 64, sort: value}\n")
    (tmp_path / "top.yaml").write_text("rows: 64\nsort: value\n")
    assert (load_config(str(tmp_path / "section.yaml"))
            == load_config(str(tmp_path / "top.yaml"))
            == CrossbarConfig(rows=64, sort="value"))
    (tmp_path / "list.yaml").write_text("crossbar: [1, 2]\n")
    with pytest.raises(ValueError, match="'crossbar:' must be a mapping"):
        load_config(str(tmp_path / "list.yaml"))


@pytest.mark.parametrize("spelling", ["None", "none", "null", "NULL", "~"])
def test_none_spellings_mean_ideal_for_the_nullable_fields(spelling, tmp_path):
    """Issue 20 defect 15: '--set input_bits=None' said "allowed None (ideal)" and refused it."""
    from crossbar_torch.apps.cli import apply_overrides
    base = CrossbarConfig(input_bits=8, adc_bits=6, g_ratio=10.0, input_range=1.0)
    sets = [f"{k}={spelling}" for k in ("input_bits", "adc_bits", "g_ratio", "input_range")]
    c = apply_overrides(base, sets)
    assert (c.input_bits, c.adc_bits, c.g_ratio, c.input_range) == (None, None, None, None)
    assert c == CrossbarConfig()
    p = tmp_path / "c.yaml"
    p.write_text(f"input_bits: {spelling}\nadc_bits: {spelling}\n")
    assert CrossbarConfig.from_yaml(p) == CrossbarConfig()
    # 'none' stays a word where it is one of the field's values
    assert load_config(None, ["sort=none", "wear_leveling=none"]).sort == "none"


def test_load_config_takes_one_override_as_a_string():
    """Issue 20 defect 16: a string was taken as a list of characters ("override 's' ...")."""
    assert load_config(None, "stuck_slices=4").stuck_slices == 4
    assert parse_overrides("rows=64") == {"rows": 64}
    assert CrossbarConfig().with_overrides("sort=value").sort == "value"


def test_a_long_wear_levelling_period_is_announced_once(recwarn):
    """Issue 20 defect 25: rows=127 with rotate counts lcm(127, 128) = 16,256 passes."""
    import warnings

    from crossbar_torch import config as config_mod
    config_mod._WARNED_PERIODS.clear()
    with pytest.warns(UserWarning) as w:
        c = CrossbarConfig(rows=127, wear_leveling="rotate")
    assert c.wear_period == 16256
    assert [str(x.message) for x in w] == [
        "wear_leveling='rotate': the mapping repeats after 16,256 passes (lcm(rows=127, "
        "cols=128) = 16,256), and counting programs every one of them (about 16,256 times the "
        "work of one pass); rows and cols with a large common divisor (e.g. cols a multiple of "
        "rows) give a short period"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the same geometry again is silent
        c.replace(seed=1)
        CrossbarConfig(rows=127, wear_leveling="rotate")
        CrossbarConfig(rows=64, cols=128, wear_leveling="rotate")  # period 128
        CrossbarConfig(rows=1024, cols=1024, wear_leveling="rotate_rows")  # exactly the limit
    with pytest.warns(UserWarning, match=r"repeats after 1,025 passes \(rows = 1,025\)"):
        CrossbarConfig(rows=1025, cols=128, wear_leveling="rotate_rows")


def test_settings_that_change_nothing_are_warned_by_convert():
    """Issue 20 defect 11: drift_nu at t_inference=1, adc_range=calibrated without adc_bits,
    input_bits_per_cycle without input_bits and compensate without stucking were accepted
    and ignored without a word."""
    import warnings

    import torch.nn as nn
    from crossbar_torch.config import ignored_settings
    cases = {
        "drift_nu=0.05, drift_nu_std=0 change nothing at t_inference=1": dict(drift_nu=0.05),
        "adc_range='calibrated' changes nothing without adc_bits": dict(adc_range="calibrated"),
        "input_bits_per_cycle=2 changes nothing without input_bits": dict(
            input_bits_per_cycle=2),
        "compensate=True changes nothing without bit stucking": dict(compensate=True),
        "filter_weight='scale' changes nothing without a write_penalty": dict(
            feedback="hessian", filter_weight="scale"),
        "filter_weight='gain' changes nothing without a write_penalty": dict(
            feedback="hessian", filter_weight="gain",
            layer_overrides={"*": {"write_penalty": 0.0}}),
    }
    for start, fields in cases.items():
        cfg = CrossbarConfig(rows=8, cols=28, **fields)
        assert len(ignored_settings(cfg)) == 1 and ignored_settings(cfg)[0].startswith(start)
        with pytest.warns(UserWarning, match="^convert: " + start.replace("(", r"\(")):
            xb.convert(nn.Linear(4, 3), cfg)
    # the same fields where they do something: silent
    for cfg in (CrossbarConfig(rows=8, cols=28, drift_nu=0.05, t_inference=10.0),
                CrossbarConfig(rows=8, cols=28, adc_bits=6, adc_range="calibrated"),
                CrossbarConfig(rows=8, cols=28, input_bits=8, input_bits_per_cycle=2),
                CrossbarConfig(rows=8, cols=28, compensate=True, stuck_slices=2,
                               reprogram_fraction=0.5),
                CrossbarConfig(rows=8, cols=28, feedback="hessian", filter_weight="gain",
                               layer_overrides={"*": {"write_penalty": 2.0}})):
        assert ignored_settings(cfg) == []
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            xb.convert(nn.Linear(4, 3), cfg)
