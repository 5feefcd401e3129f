"""The exceptions crossbar_torch raises on purpose, for users to catch.

Every one is a :class:`CrossbarError`. Those that mean "what you gave is wrong" (a config field,
a device YAML, a path, a command-line argument, a checkpoint that does not fit) are
:class:`UserInputError`, which is also a ``ValueError``, so ``except ValueError`` keeps working.
The scripts (``crossbar_torch.apps.cli.run_main``) answer a ``UserInputError`` with one line
``error: <message>`` and exit status 2; anything else is a bug (of the package or of the caller)
and keeps its traceback (exit status 1)::

    CrossbarError
    └── UserInputError (ValueError)
        ├── ConfigError          a CrossbarConfig field, or the config file that holds it
        │   └── DeviceError      a device preset name or device YAML
        ├── UsageError           a command-line argument or a file it names (cli.UsageError)
        ├── ModelStateError      the model is not in the state the call needs (not converted,
        │                        converted with another config, a layer never programmed)
        ├── InvalidTensorError   a tensor given holds NaN / Inf or is empty
        ├── TensorTypeError      (also TypeError) a tensor given has the wrong dtype
        └── MissingDependencyError (also ImportError): an optional package is not installed

Modules define their own subclasses next to the code that raises them (for example
``checkpoint.WeightLoadError``, ``data.UnreadableImageError``, ``frontier.FrontierError``,
``finetune.ResumeError``); each is one of the above.
"""
from __future__ import annotations


class CrossbarError(Exception):
    """Base of every exception crossbar_torch raises on purpose."""


class UserInputError(CrossbarError, ValueError):
    """The input is wrong (a value, a file, an argument): the message names it. Scripts print
    it as one ``error:`` line and exit with status 2."""


class ConfigError(UserInputError):
    """A :class:`~crossbar_torch.CrossbarConfig` field is invalid, unknown, or does not fit the
    model or the other fields; the message names the field and its value."""


class DeviceError(ConfigError):
    """A device preset name or a device YAML is invalid; the message names the file and key."""


class UsageError(UserInputError):
    """A mistake in a command line or in a file it names."""


class ModelStateError(UserInputError):
    """The model (or a layer) is not in the state the call needs: no crossbar layers, already
    converted with another config, or a crossbar layer that was never programmed."""


class InvalidTensorError(UserInputError):
    """A tensor given (weights, a calibration batch, a layer input) holds NaN or Inf values or
    is empty; the message names it."""


class TensorTypeError(UserInputError, TypeError):
    """A tensor given has a dtype the call cannot use; the message names it."""


class MissingDependencyError(UserInputError, ImportError):
    """A feature needs an optional package that is not installed; the message says which and
    how to install it."""
