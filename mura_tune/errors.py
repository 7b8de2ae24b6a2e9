"""One exception root for every user-facing failure, and the rules whose breach is one.

The CLI catches :class:`MuraTuneError`, prints its message as one line and exits non-zero.
Anything else is a bug and keeps its traceback (as does everything under ``--debug``).
"""

from __future__ import annotations

from dataclasses import dataclass


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


@dataclass(frozen=True)
class Range:
    """A rule on one number, stated the way its error states it: "an integer >= 1", "a number in (0, 1)".

    The command line parses a flag with it (:meth:`parse`) and the library checks the same value
    with it (:meth:`check`), so a rule is written once.
    """

    kind: type  # int or float
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    @property
    def text(self) -> str:
        what = "an integer" if self.kind is int else "a number"
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high}"
        if self.low is not None and self.high is not None:
            rule = f"in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}"
        else:
            rule = lo or hi
        return f"{what} {rule}".rstrip()

    def holds(self, value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        if self.kind is int and not isinstance(value, int):
            return False
        if value != value:  # nan fails every rule
            return False
        too_low = self.low is not None and (
            value <= self.low if self.low_open else value < self.low
        )
        too_high = self.high is not None and (
            value >= self.high if self.high_open else value > self.high
        )
        return not (too_low or too_high)

    def check(self, value, name: str):
        """``value`` if the rule holds, else ConfigError("NAME must be <rule>, got VALUE")."""
        if not self.holds(value):
            raise ConfigError(f"{name} must be {self.text}, got {value!r}")
        return value

    def parse(self, text: str):
        """Parse command-line ``text``; ValueError says the rule (argparse puts the flag in front)."""
        try:
            value = self.kind(text)
        except ValueError:
            raise ValueError(f"must be {self.text}, got {text!r}") from None
        if not self.holds(value):
            raise ValueError(f"must be {self.text}, got {text}")
        return value
