"""The Ray Tune callback that makes every trial an MLflow run (see :mod:`mura_tune.search.tracking`).

It is Ray Tune's own ``MLflowLoggerCallback`` (experiment set-up, params, metrics, run ends, all
in the driver) with three changes for mura-tune's trials:

* one run per trial id: a trial resumed by ``--resume`` or restored by Ray continues its run
  (found by its ``trial_id`` tag) instead of opening a second one;
* metrics are the trial's own (Ray's bookkeeping keys are left out), logged at ``step = epoch``
  (Ray's ``training_iteration`` restarts at 1 when a trial resumes);
* the run ends with the leaderboard's words: tag ``status`` COMPLETED, PRUNED (stopped by ASHA)
  or ERROR, and MLflow's FINISHED, KILLED or FAILED. :func:`~mura_tune.search.tracking.record_leaderboard`
  confirms them (and adds the paths) once the leaderboard is built.

Imported only when a search logs to MLflow (it imports Ray Tune, and MLflow when built).
"""

from __future__ import annotations

from ray.air.integrations.mlflow import MLflowLoggerCallback
from ray.tune.result import AUTO_RESULT_KEYS

from mura_tune.constants import TIME_ATTR
from mura_tune.layout import TrialStatus
from mura_tune.search.plan import SearchPlan
from mura_tune.search.tracking import RUN_STATUS, TAG_KIND, TAG_STATUS, TAG_TRIAL, open_experiment

#: Reported values that are not metrics of the trial.
NOT_METRICS = {*AUTO_RESULT_KEYS, "done", "trial_finished", "should_checkpoint", TIME_ATTR}


class TrialRuns(MLflowLoggerCallback):
    """One MLflow run per trial of one scope of ``plan`` (``plan.mlflow`` is the tracking URI)."""

    def __init__(self, plan: SearchPlan, scope: str):
        super().__init__(
            tracking_uri=plan.mlflow,
            experiment_name=plan.name,
            tags={TAG_KIND: "trial", "experiment": plan.name, "space": plan.space, "scope": scope},
        )
        #: The config every trial of the scope shares (space, preset, --set), logged as params too.
        self.shared = {k: v for k, v in plan.fixed.items() if v is not None}

    def setup(self, *args, **kwargs):
        open_experiment(
            self.tracking_uri, self.experiment_name
        )  # our artifact folder, one-line errors
        super().setup(*args, **kwargs)

    def log_trial_start(self, trial):
        if trial not in self._trial_runs:
            self._trial_runs[trial] = self._run_of(trial)
        params = {**self.shared, **trial.config}
        self.mlflow_util.log_params(run_id=self._trial_runs[trial], params_to_log=params)

    def _run_of(self, trial) -> str:
        """The trial's run: the one it already has (a resumed trial), reopened, or a new one."""
        client = self.mlflow_util._get_client()
        found = client.search_runs(
            [self.mlflow_util.experiment_id],
            filter_string=f"tags.{TAG_KIND} = 'trial' and tags.{TAG_TRIAL} = '{trial.trial_id}'",
            max_results=1,
        )
        if found:
            run_id = found[0].info.run_id
            client.update_run(run_id, status="RUNNING")
            return run_id
        tags = {**self.tags, TAG_TRIAL: trial.trial_id, TAG_STATUS: TrialStatus.RUNNING.value}
        return self.mlflow_util.start_run(run_name=str(trial), tags=tags).info.run_id

    def log_trial_result(self, iteration: int, trial, result: dict):
        metrics = {
            k: v
            for k, v in result.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
        }
        step = int(result.get(TIME_ATTR) or result.get("training_iteration") or 0)
        self.mlflow_util.log_metrics(
            run_id=self._trial_runs[trial], metrics_to_log=metrics, step=step
        )

    def log_trial_end(self, trial, failed: bool = False):
        run_id = self._trial_runs.get(trial)
        if run_id is None:
            return
        if failed:
            status = TrialStatus.ERROR
        elif (trial.last_result or {}).get("trial_finished"):
            status = TrialStatus.COMPLETED
        else:
            status = TrialStatus.PRUNED
        self.mlflow_util._get_client().set_tag(run_id, TAG_STATUS, status.value)
        self.mlflow_util.end_run(run_id=run_id, status=RUN_STATUS[status])
