"""One exception root for every user-facing failure, and the rules whose breach is one.

The CLI catches :class:`MuraTuneError`, prints its message as one line and exits non-zero.
Anything else is a bug and keeps its traceback (as does everything under ``--debug``).
"""

from __future__ import annotations

import difflib
import numbers
from collections.abc import Iterable
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


class RunFailed(MuraTuneError):
    """The work ran and failed (a training run that diverged, a search in which no trial finished)."""

    exit_code = 1


#: What torch's refusal of a pickled file says (with advice to load it unsafely, never passed on).
UNSAFE_ADVICE = ("Weights only load failed", "weights_only=False", "can still be loaded")
REFUSED_PICKLE = (
    "refused: it holds pickled objects other than tensors, and files are only ever loaded with "
    "weights_only=True"
)


def first_line(exc: BaseException) -> str:
    """An exception's first line (its type's name when it has no message): the one-line form."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def without_unsafe_advice(text: str) -> str:
    """``text`` with any advice to load a file unsafely (torch's ``weights_only=False`` hint)
    replaced by why the file was refused."""
    at = [text.find(marker) for marker in UNSAFE_ADVICE if marker in text]
    if not at:
        return text
    head = text[: min(at)].rstrip(" .:")
    return f"{head}: {REFUSED_PICKLE}" if head else REFUSED_PICKLE


def check_int(name: str, value: object, low: int) -> None:
    """Raise ConfigError unless ``value`` is an integer (not a bool; numpy's count) >= ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}")


def closest(name: str, options: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the option closest to a mistyped ``name`` ('' if none is close)."""
    match = difflib.get_close_matches(name, list(options), n=1)
    return f" (did you mean {match[0]!r}?)" if match else ""


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
