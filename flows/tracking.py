"""MLflow tracking: where runs go, one run per stage nested under the pipeline's run, and child runs per block.

Tracking URI: `mlflow.tracking_uri` from the config, or `sqlite:///<project>/mlflow.db` with the experiment's
artifacts under `<project>/mlruns` (an absolute location, so a run's artifacts do not depend on the working
directory of whoever logs them). A server URI (http://...) works the same; the server then decides where
artifacts go.

Nesting: the pipeline flow creates the parent run and passes its id to the stage processes in the environment
variable DNA_MLFLOW_PARENT_RUN_ID; a stage started on its own (python -m flows.step_flow teacher, or dvc repro) makes a
top-level run. Block runs are made through MlflowClient with explicit run ids, so they can be logged from any
thread, process or Dask worker.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from dna.config import Params

log = logging.getLogger(__name__)

PARENT_ENV = "DNA_MLFLOW_PARENT_RUN_ID"
STAGE_TAG = "dna.stage"


def tracking_uri(params: Params, root: str | Path | None = None) -> str:
    if params.mlflow.tracking_uri:
        return params.mlflow.tracking_uri
    return f"sqlite:///{(Path(root or os.getcwd()) / 'mlflow.db').resolve()}"


def artifact_location(uri: str, root: str | Path | None = None) -> str | None:
    """An absolute artifact location for a local store; None (the server's choice) for a tracking server."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (Path(root or os.getcwd()) / "mlruns").resolve().as_uri()


def ensure_experiment(uri: str, name: str, root: str | Path | None = None) -> str:
    """The id of the named experiment, created with an absolute artifact location if it does not exist yet."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            client.restore_experiment(found.experiment_id)
        return found.experiment_id
    try:
        return client.create_experiment(name, artifact_location=artifact_location(uri, root))
    except MlflowException:  # another process created it in the meantime
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


@dataclass(frozen=True)
class Tracking:
    """Where to log, and the run that new child runs nest under; small and picklable, so tasks can take it."""

    uri: str
    experiment_id: str
    run_id: str | None = None

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def child(self, name: str, tags: dict[str, str] | None = None) -> RunLog:
        """Start a run nested under `run_id` (or a top-level run if there is none)."""
        tags = dict(tags or {})
        if self.run_id:
            tags["mlflow.parentRunId"] = self.run_id
        run = self.client().create_run(self.experiment_id, run_name=name, tags=tags)
        return RunLog(self.uri, run.info.run_id)


@dataclass(frozen=True)
class RunLog:
    """Logging to one run by id: usable from any thread or process."""

    uri: str
    run_id: str

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(self.uri)

    def metrics(self, values: dict, step: int | None = None, prefix: str = "") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(f"{prefix}{k}", float(v), now, step or 0) for k, v in values.items()
                 if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))]
        if batch:
            self.client().log_batch(self.run_id, metrics=batch)

    def epoch(self, row: dict, prefix: str = "") -> None:
        """One row of a training history (with an `epoch` key) as metrics at step = epoch."""
        self.metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]), prefix=prefix)

    def params(self, values: dict[str, str]) -> None:
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in values.items()]
        for start in range(0, len(items), 100):
            self.client().log_batch(self.run_id, params=items[start:start + 100])

    def tags(self, values: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        items = [RunTag(k, str(v)) for k, v in values.items() if v is not None]
        if items:
            self.client().log_batch(self.run_id, tags=items)

    def artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        path = Path(path)
        if path.is_file():
            self.client().log_artifact(self.run_id, str(path), artifact_path)

    def finish(self, failed: bool = False) -> None:
        self.client().set_terminated(self.run_id, "FAILED" if failed else "FINISHED")


@contextlib.contextmanager
def child_run(tracking: Tracking, name: str, tags: dict[str, str] | None = None) -> Iterator[RunLog]:
    run = tracking.child(name, tags)
    try:
        yield run
    except BaseException:
        run.finish(failed=True)
        raise
    run.finish()


def parent_run_id(uri: str) -> str | None:
    """The pipeline's run from the environment, if it exists in this tracking store."""
    parent = os.environ.get(PARENT_ENV)
    if not parent:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(uri).get_run(parent)
    except MlflowException:
        log.warning("%s=%s is not a run in %s: this stage's run is not nested", PARENT_ENV, parent, uri)
        return None
    return parent


def _prefect_tags() -> dict[str, str]:
    try:
        from prefect.runtime import flow_run

        return {"prefect.flow_run_id": str(flow_run.id), "prefect.flow_run_name": str(flow_run.name)} \
            if flow_run.id else {}
    except Exception:  # noqa: BLE001 - tags are a convenience; never fail a stage for them
        return {}


@contextlib.contextmanager
def stage_run(params: Params, stage: str, logged_params: dict[str, str] | None = None,
              root: str | Path | None = None, active: bool = True,
              target: str | None = None) -> Iterator[tuple[RunLog, Tracking]]:
    """The stage's MLflow run, active in this thread (so mlflow.* fluent calls log to it; active=False: not, for
    a run that others nest under in the same thread), nested under the pipeline's run when DNA_MLFLOW_PARENT_RUN_ID
    names one; of a search target's step, named and tagged (dna.target) for it. Yields the run and a Tracking for its
    child runs. Ends FINISHED, or FAILED if the body raises."""
    import mlflow

    from flows.hashes import git_commit, params_hash

    uri = tracking_uri(params, root)
    mlflow.set_tracking_uri(uri)
    experiment_id = ensure_experiment(uri, params.mlflow.experiment, root)
    parent = parent_run_id(uri)
    tags = {STAGE_TAG: stage, "dna.params_hash": params_hash(params), **_prefect_tags()}
    if target is not None:  # a per-target step's run: named <stage>@<target>
        tags["dna.target"] = target
        stage = f"{stage}@{target}"
    commit = git_commit(root)
    if commit:
        tags["mlflow.source.git.commit"] = commit
    if not active:
        with child_run(Tracking(uri, experiment_id, parent), stage, tags) as run:
            if logged_params:
                run.params(logged_params)
            yield run, Tracking(uri, experiment_id, run.run_id)
        return
    with mlflow.start_run(experiment_id=experiment_id, run_name=stage, parent_run_id=parent, tags=tags) as active:
        run = RunLog(uri, active.info.run_id)
        if logged_params:
            run.params(logged_params)
        yield run, Tracking(uri, experiment_id, active.info.run_id)


@contextlib.contextmanager
def nested_under(run_id: str) -> Iterator[None]:
    """Stage runs started meanwhile (in this process or those it starts) nest under run_id."""
    previous = os.environ.get(PARENT_ENV)
    os.environ[PARENT_ENV] = run_id
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(PARENT_ENV, None)
        else:
            os.environ[PARENT_ENV] = previous


def nested_runs(uri: str, parent_run_id: str) -> list:
    """The runs directly under a run, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    parent = client.get_run(parent_run_id)
    return sorted(client.search_runs([parent.info.experiment_id],
                                     filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'"),
                  key=lambda r: r.info.start_time)


class EpochLog:
    """The on_epoch hook of a training stage: each epoch's row to MLflow (and to a Prefect progress artifact);
    afterwards, `backfill` logs the epochs the hook did not see (those a resumed run had done before, or all of them
    when the stage ran in other processes) from the stage's history file, and shows the last one's progress."""

    def __init__(self, mlrun: RunLog, progress=None, describe=None, prefix: str = ""):
        self.mlrun, self.progress, self.describe, self.prefix = mlrun, progress, describe, prefix
        self.logged: set[int] = set()

    def __call__(self, row: dict) -> None:
        self.mlrun.epoch(row, self.prefix)
        self.logged.add(int(row["epoch"]))
        if self.progress is not None:
            self.progress.update(int(row["epoch"]), self.describe(row))

    def backfill(self, history_csv: str | Path) -> None:
        import pandas as pd

        if not Path(history_csv).is_file():
            return
        missed = [row for row in pd.read_csv(history_csv).to_dict("records") if int(row["epoch"]) not in self.logged]
        for row in missed:
            self.mlrun.epoch(row, self.prefix)
        if missed and self.progress is not None:
            self.progress.update(int(missed[-1]["epoch"]), self.describe(missed[-1]))
