"""The application's set-up, imported first by every module of flows that imports Prefect, MLflow or DVC or that a
process starts from (`python -m flows.<module>`, a deployment's entry point): the environment defaults
(flows/env.py), set before those libraries are imported since they read their settings then, and the params
schema's pipeline sections (flows/settings.py). The `dna` command does the same through its entry points
(`dna.setup`, `dna.sections`). Importing the `flows` package, its settings or its step table changes nothing.
"""
from flows.env import configure_environment

configure_environment()

from dna.config import use_sections  # noqa: E402 - after the environment is set
from flows.settings import SECTIONS  # noqa: E402

use_sections(SECTIONS)
