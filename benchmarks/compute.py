"""Compute counted by the operating system: the CPU-seconds of every process of a session.

An arm of a benchmark runs as its own process session (``setsid``): the arm's Python process,
and for a search also Ray's daemons and every trial worker, which Ray starts as descendants.
:class:`CpuMeter` sums user + system time over all processes of that session, polling ``/proc``
twice a second (a process that exits keeps the time it had at its last poll, so a few
hundredths of a second can go uncounted). Budgets in CPU-seconds are what the arms are
compared at: they do not depend on how busy the machine is, as wall-clock budgets would.

Linux only (``/proc``); elsewhere the meter counts this process alone (``time.process_time``).
"""

from __future__ import annotations

import math
import os
import threading
import time
from pathlib import Path

_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def session_cpu(sid: int) -> dict[tuple[int, int], float]:
    """CPU-seconds of each live process of session ``sid``, keyed by (pid, start time)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # the process ended meanwhile
            continue
        fields = stat[stat.rfind(")") + 2 :].split()  # after "pid (comm) ": state is fields[0]
        if int(fields[3]) != sid:  # field 6 of stat: the session
            continue
        # fields 14/15 (utime, stime) and 22 (start time) of stat
        out[(int(entry.name), int(fields[19]))] = (int(fields[11]) + int(fields[12])) / _TICKS
    return out


class CpuMeter:
    """CPU-seconds used by this process's session since the meter started."""

    def __init__(self, interval: float = 0.5):
        self.proc = Path("/proc/self/stat").exists()
        self.sid = os.getsid(0)
        self._seen: dict[tuple[int, int], float] = {}
        self._lock = threading.Lock()
        self._base = self._total(self._poll()) if self.proc else time.process_time()
        self._last = 0.0
        self._stop = threading.Event()
        if self.proc:
            threading.Thread(target=self._run, args=(interval,), daemon=True).start()

    def _poll(self) -> dict[tuple[int, int], float]:
        now = session_cpu(self.sid)
        with self._lock:
            self._seen.update(now)
            return dict(self._seen)

    @staticmethod
    def _total(seen: dict) -> float:
        return math.fsum(seen.values())

    def _run(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self._last = self._total(self._poll()) - self._base

    def used(self) -> float:
        """CPU-seconds so far (as of the last poll: cheap enough to ask after every step)."""
        if not self.proc:
            return time.process_time() - self._base
        return self._last

    def measure(self) -> float:
        """CPU-seconds so far, polled now."""
        if not self.proc:
            return time.process_time() - self._base
        self._last = self._total(self._poll()) - self._base
        return self._last

    def close(self) -> None:
        self._stop.set()


#: The meter of this process (set by :func:`start`); Ray Tune objects below read it by module,
#: so that pickling them (Ray saves its run configuration) never copies a thread or a lock.
METER: CpuMeter | None = None


def start() -> CpuMeter:
    global METER
    METER = CpuMeter()
    return METER


def spent(budget: float) -> bool:
    """Whether this process's session has used ``budget`` CPU-seconds."""
    return METER is not None and METER.used() >= budget


# Module-level classes: Ray pickles its run configuration, and these then pickle by reference.
from ray import tune  # noqa: E402


class BudgetStopper(tune.Stopper):
    """Ends the whole search once this session used ``budget`` CPU-seconds."""

    def __init__(self, budget: float):
        self.budget = budget

    def __call__(self, trial_id, result):
        return False

    def stop_all(self):
        return spent(self.budget)


class EpochRecorder(tune.Callback):
    """Records ``(CPU-seconds, trial id, result[key])`` of every reported result, in the driver."""

    def __init__(self, key: str):
        self.key = key
        self.events: list[tuple[float, str, float]] = []

    def __getstate__(self):
        return {"key": self.key, "events": []}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.key)
        if isinstance(value, (int, float)) and math.isfinite(value) and METER is not None:
            self.events.append((round(METER.measure(), 2), trial.trial_id, float(value)))
