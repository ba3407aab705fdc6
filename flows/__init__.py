"""Prefect flows around `dna.pipeline`: one flow per stage, the pipeline flow that runs DVC, and model promotion.

Importing this package first points every tool's state (Prefect's home, scikit-learn's data, matplotlib's cache)
inside the project and turns telemetry off, before Prefect or MLflow are imported.
"""
from flows.env import configure_environment

configure_environment()
