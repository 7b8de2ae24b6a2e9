"""One exception root for every user-facing failure.

The CLI catches :class:`MuraTuneError`, prints its message as one line and exits non-zero.
Anything else is a bug and keeps its traceback (as does everything under ``--debug``).
"""

from __future__ import annotations


class MuraTuneError(Exception):
    """Base class: an error the user can fix. The message names the problem and the path/flag."""

    exit_code = 2


class DataError(MuraTuneError):
    """The dataset (folder, CSV, manifest or image) is missing or malformed."""


class ConfigError(MuraTuneError):
    """A configuration value or command-line flag is invalid."""


class WeightsError(MuraTuneError):
    """Pretrained weights cannot be had."""


class ExperimentError(MuraTuneError):
    """An experiment folder is missing, incomplete or inconsistent."""
