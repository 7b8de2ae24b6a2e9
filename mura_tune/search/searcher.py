"""Optuna's TPE as Ray Tune's searcher (told the truth about pruned and failed trials), and ASHA.

Ray's ``OptunaSearch`` records a trial ASHA stopped after one epoch as COMPLETE with that
epoch's score; ours tells Optuna ``PRUNED`` (with its intermediate values) and errors as
``FAIL``, never as a score.
"""

from __future__ import annotations

import math
import warnings

from mura_tune.constants import METRIC, MODE, TIME_ATTR
from mura_tune.layout import study_name
from mura_tune.search.plan import SearchPlan

#: ASHA's and TPE's time axis: our own epoch counter, which survives restarts (Ray's
#: ``training_iteration`` starts again at 1 when a trial is restarted without a Ray checkpoint).
STEP = TIME_ATTR


def _searcher_class():
    from optuna.trial import TrialState
    from ray.tune.search import Searcher
    from ray.tune.search.optuna import OptunaSearch

    class MuraOptunaSearch(OptunaSearch):
        """OptunaSearch that tells Optuna the truth about how a trial ended.

        Ray's OptunaSearch marks every trial with a final metric COMPLETE, so a trial ASHA
        stopped after one epoch would count as a finished trial with its 1-epoch score. Our
        trainable reports ``trial_finished`` on its last epoch; a trial that ends without it
        was stopped by the scheduler and is told to Optuna as PRUNED (its intermediate values
        were reported every epoch, with the epoch as step). Errors and non-finite values are
        FAIL, never a score.

        Crash safety: each Optuna trial records its Ray trial id (user attribute
        ``ray_trial_id``), so a resumed search can tell which Optuna trials a killed driver left
        behind; telling an Optuna trial that is already finished is a no-op; and the study
        never grows past ``num_samples`` trials (re-queued WAITING trials are proposed first),
        whatever Ray's own trial counter restored from a state saved before the crash says.
        """

        def __init__(self, *args, num_samples: int, **kwargs):
            super().__init__(*args, **kwargs)
            self._num_samples = num_samples

        def suggest(self, trial_id: str):
            if trial_id not in self._ot_trials and self._budget_spent():
                return Searcher.FINISHED
            config = super().suggest(trial_id)
            ot_trial = self._ot_trials.get(trial_id)
            if ot_trial is not None and ot_trial.user_attrs.get("ray_trial_id") != trial_id:
                ot_trial.set_user_attr("ray_trial_id", trial_id)  # also re-points a re-queued trial
            return config

        def _budget_spent(self) -> bool:
            trials = self._ot_study.get_trials(deepcopy=False)
            return len(trials) >= self._num_samples and not any(
                t.state == TrialState.WAITING for t in trials
            )

        def on_trial_result(self, trial_id: str, result: dict) -> None:
            value, step = result.get(self.metric), result.get(STEP)
            if (
                trial_id in self._ot_trials
                and trial_id not in self._completed_trials
                and step is not None
                and isinstance(value, (int, float))
                and math.isfinite(value)
                and not self._finished_in_storage(trial_id)
            ):
                self._ot_trials[trial_id].report(value, step)

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
            if trial_id in self._completed_trials or trial_id not in self._ot_trials:
                return
            self._completed_trials.add(trial_id)
            stored = self._stored(trial_id)
            if stored.state.is_finished():
                return
            ot_trial = self._ot_trials[trial_id]
            result = result or {}
            value, step = result.get(self.metric), result.get(STEP)
            finite = isinstance(value, (int, float)) and math.isfinite(value)
            if not error and finite and step is not None and step not in stored.intermediate_values:
                # Ray may hand the final result only to on_trial_complete: record it as the last rung value.
                ot_trial.report(value, step)
            if error or not finite:
                state, value = TrialState.FAIL, None
            elif result.get("trial_finished"):
                state = TrialState.COMPLETE
            else:
                state, value = TrialState.PRUNED, None
            self._ot_study.tell(ot_trial, value, state=state, skip_if_finished=True)

        def _stored(self, trial_id: str):
            """The Optuna trial as stored (state and intermediate values), not the searcher's handle."""
            return self._ot_study._storage.get_trial(self._ot_trials[trial_id]._trial_id)

        def _finished_in_storage(self, trial_id: str) -> bool:
            return self._stored(trial_id).state.is_finished()

    return MuraOptunaSearch


def make_searcher(plan: SearchPlan, scope: str, sample_fn, start: list[dict] | None = None):
    """The Optuna searcher of one scope: TPE (or random sampling), its study in ``optuna.db``.

    Args:
        plan: the search.
        scope: ``"all"`` or a body part.
        sample_fn: the space's define-by-run function (``SearchSpace.sampler_fn(preset)``).
        start: configurations to run first in a new study (``SearchSpace.start_points``);
            random search, the baseline, ignores them.
    """
    import optuna

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    n = plan.scopes[scope]
    if plan.random_search:
        sampler = optuna.samplers.RandomSampler(seed=plan.seed)
    else:
        # Few startup trials for small budgets, TPE's default (10) for large ones.
        startup = max(2, min(10, n // 3))
        sampler = optuna.samplers.TPESampler(
            seed=plan.seed,
            constant_liar=True,
            multivariate=True,
            group=True,
            n_startup_trials=startup,
        )
    storage = optuna.storages.RDBStorage(f"sqlite:///{plan.experiment.optuna_db}")
    name = study_name(plan.name, scope)
    # The space's known-good configurations run first (a new study only: a resumed one has them).
    # Random search, the baseline, gets none.
    new_study = name not in {s.study_name for s in storage.get_all_studies()}
    points = list(start or []) if new_study and not plan.random_search else []
    return _searcher_class()(
        space=sample_fn,
        points_to_evaluate=points[:n] or None,
        metric=METRIC,
        mode=MODE,
        sampler=sampler,
        study_name=name,
        storage=storage,
        seed=plan.seed,
        num_samples=n,
    )


def make_scheduler(plan: SearchPlan):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if plan.random_search:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr=STEP,
        metric=METRIC,
        mode=MODE,
        max_t=plan.max_epochs,
        grace_period=plan.grace_period,
        reduction_factor=plan.reduction_factor,
    )
