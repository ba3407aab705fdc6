"""The sections of params.yaml that the pipeline owns, not the method: MLflow tracking and orchestration.

They join the one schema (dna.config.Params) through the `dna.sections` entry points in pyproject.toml, so a
params file is still validated whole, in one place, before any work.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TrackingConfig(Section):
    """MLflow: where runs are tracked and under which name exported models are registered."""

    tracking_uri: str | None = None  # None: a SQLite file mlflow.db in the working directory
    experiment: str = "dna"
    registered_model: str = "dna-student"
    promote_metric: Literal["test_accuracy", "onnx_test_accuracy"] = "test_accuracy"


class OrchestrationConfig(Section):
    """How the flows fan out blocks: threads, processes, a Dask cluster or Ray."""

    task_runner: Literal["threads", "processes", "dask", "ray"] = "threads"
    max_workers: Annotated[int, Field(gt=0)] = 2
    cluster_address: str | None = None  # dask or ray: a running cluster; None: a local one of max_workers workers
    # dask or ray: what each block task holds while it runs, e.g. {GPU: 1} with Dask workers started
    # `dask worker ... --resources GPU=1` (a worker then runs one block per GPU it declares) or Ray nodes with GPUs
    task_resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    nproc: Annotated[int, Field(gt=0)] = 1  # > 1: the teacher, each distill block and retrain train in N processes
