"""The named exceptions (crossbar_torch.errors) and run_main's split: a user mistake is one line
and exit status 2, a bug keeps its traceback (exit status 1) (issue 17)."""
import subprocess
import sys

import pytest

import crossbar_torch as xb
from crossbar_torch import errors
from crossbar_torch.apps.cli import ArgumentParser, UsageError, run_main, user_errors
from crossbar_torch.apps.data import UnreadableImageError
from crossbar_torch.device import load_device
from crossbar_torch.apps.finetune import ResumeError, TrainingDiverged
from crossbar_torch.apps.frontier import FrontierError
from crossbar_torch.apps.checkpoint import WeightLoadError


def test_the_hierarchy():
    assert issubclass(errors.UserInputError, errors.CrossbarError)
    assert issubclass(errors.UserInputError, ValueError)  # old `except ValueError` still works
    assert issubclass(errors.DeviceError, errors.ConfigError)
    assert issubclass(errors.MissingDependencyError, ImportError)
    assert UsageError is errors.UsageError and xb.ConfigError is errors.ConfigError
    for cls in (errors.ConfigError, errors.DeviceError, errors.UsageError,
                errors.MissingDependencyError, WeightLoadError, UnreadableImageError,
                FrontierError, ResumeError, TrainingDiverged):
        assert issubclass(cls, errors.UserInputError), cls
    assert issubclass(WeightLoadError, RuntimeError)  # as before
    assert user_errors() == (errors.UserInputError,)


def test_config_and_device_mistakes_raise_the_named_classes():
    with pytest.raises(errors.ConfigError, match="rows=0"):
        xb.CrossbarConfig(rows=0)
    with pytest.raises(errors.ConfigError, match="nosuch"):
        xb.CrossbarConfig.from_dict({"nosuch": 1})
    with pytest.raises(errors.ConfigError, match="key=value"):
        xb.CrossbarConfig().with_overrides(["rows"])
    with pytest.raises(errors.DeviceError, match="unknown device 'floppy'"):
        load_device("floppy")


def _exit(capsys, exc):
    def main(argv):
        raise exc
    with pytest.raises(SystemExit) as e:
        run_main(main, [])
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize("exc", [errors.ConfigError("CrossbarConfig.rows=0 is invalid"),
                                 UsageError("--data 'x': no such folder"),
                                 errors.MissingDependencyError("--plot needs matplotlib")])
def test_run_main_answers_a_user_error_with_one_line(capsys, exc):
    code, err = _exit(capsys, exc)
    assert code == 2 and err == f"error: {exc}\n"


@pytest.mark.parametrize("exc", [ValueError("internal shape mismatch"),
                                 ImportError("cannot import name '_C'"),
                                 FileNotFoundError("/internal/file"), KeyError("k"),
                                 RuntimeError("kernel failed")])
def test_run_main_lets_a_bug_propagate(capsys, exc):
    """Before issue 17 every ValueError / ImportError / OSError became `error:` + exit 2."""
    def main(argv):
        raise exc
    with pytest.raises(type(exc)):
        run_main(main, [])
    assert "error:" not in capsys.readouterr().err


def test_argparse_errors_stay_one_line(capsys):
    def main(argv):
        p = ArgumentParser(prog="x")
        p.add_argument("--n", type=int)
        p.parse_args(argv)
    with pytest.raises(SystemExit) as e:
        run_main(main, ["--n", "two"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: argument --n: invalid int value")
    assert len(err.splitlines()) == 1


def test_a_bug_in_a_script_shows_its_traceback_and_exits_1():
    code = ("from crossbar_torch.apps.cli import run_main\n"
            "def main(argv):\n    return {}['missing']\n"
            "run_main(main)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "Traceback" in r.stderr and "KeyError: 'missing'" in r.stderr
    assert "error:" not in r.stderr
