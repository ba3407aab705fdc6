"""Prefect flows around the `dna` stages: the pipeline flow (every stage as a task in one process, recorded in DVC's
lock file), one flow per step, and model registration.

Importing this package composes the params schema (the method's sections and the pipeline's, flows/settings.py), and
first points every tool's state (Prefect's home, scikit-learn's data, matplotlib's cache) inside the project and turns
telemetry off where the environment does not say otherwise, before Prefect or MLflow are imported.
"""
from flows.env import configure_environment

configure_environment()

from dna.config import use_sections  # noqa: E402 - after the environment is set
from flows.settings import SECTIONS  # noqa: E402

use_sections(SECTIONS)
