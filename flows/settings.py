"""The sections of params.yaml that the pipeline owns, not the method: MLflow tracking and orchestration.

The flows add them to the schema when a flows entry point sets the application up (flows/app.py), and the `dna`
command through the `dna.sections` entry points in pyproject.toml, so a params file is still validated whole,
in one place, before any work; the method itself (dna/) neither reads nor imports them.
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_WORKERS = 256  # threads, processes or local cluster workers; more blocks or networks than that never run at once
# MLflow refuses / and : in a registered model's name (its file store \ and % too) and names that are paths (., ..)
MODEL_NAME_REFUSED = "/:\\%"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TrackingConfig(Section):
    """MLflow: where runs are tracked and under which name exported models are registered."""

    tracking_uri: str | None = None  # None: a SQLite file mlflow.db in the working directory
    experiment: str = "dna"
    registered_model: str = "dna-student"
    promote_metric: Literal["test_accuracy", "onnx_test_accuracy"] = "test_accuracy"

    @field_validator("registered_model")
    @classmethod
    def _model_name(cls, name: str) -> str:
        refused = sorted({c for c in name if c in MODEL_NAME_REFUSED})
        if not name.strip() or name.strip() in (".", "..") or refused:
            raise ValueError(f"mlflow.registered_model={name!r} is not a name MLflow registers: it must not be empty, "
                             f"'.' or '..', nor hold any of {' '.join(MODEL_NAME_REFUSED)}"
                             + (f" (it holds {' '.join(refused)})" if refused else ""))
        return name


class OrchestrationConfig(Section):
    """How the flows fan out blocks: threads, processes, a Dask cluster or Ray."""

    task_runner: Literal["threads", "processes", "dask", "ray"] = "threads"
    max_workers: Annotated[int, Field(gt=0, le=MAX_WORKERS)] = 2
    cluster_address: str | None = None  # dask or ray: a running cluster; None: a local one of max_workers workers
    # dask or ray: what each block task holds while it runs, e.g. {GPU: 1} with Dask workers started
    # `dask worker ... --resources GPU=1` (a worker then runs one block per GPU it declares) or Ray nodes with GPUs
    task_resources: dict[str, Annotated[float, Field(gt=0)]] = {}
    retries: Annotated[int, Field(ge=0, le=10)] = 1
    nproc: Annotated[int, Field(gt=0)] = 1  # > 1: the teacher, each distill block and retrain train in N processes


SECTIONS = {"mlflow": TrackingConfig, "orchestration": OrchestrationConfig}
