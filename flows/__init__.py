"""Prefect flows around the `dna` stages: the pipeline flow (every stage as a task in one process, recorded in DVC's
lock file), one flow per step, and model registration.

Importing the package does nothing: a module that a process starts from, or that imports Prefect, MLflow or DVC,
imports flows/app.py first, which sets the application up (the environment, then the params schema's sections).
"""
