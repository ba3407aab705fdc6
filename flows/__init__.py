"""Prefect flows around `dna.pipeline`: one flow per stage, the pipeline flow that runs DVC, and model promotion.

Importing this package composes the params schema (the method's sections and the pipeline's, flows/settings.py), and
first points every tool's state (Prefect's home, scikit-learn's data, matplotlib's cache)
inside the project and turns telemetry off, before Prefect or MLflow are imported. Then, when this process is
`python -m flows.<module>`, it hands the command to a warm host that has those imported already and exits with the
step's status (flows/warm.py, flows/warm_host.py; DNA_WARM=0 turns it off).
"""
from flows.env import configure_environment
from flows.warm import delegate_from_package_import

configure_environment()
delegate_from_package_import()

from dna.config import use_sections  # noqa: E402 - after the environment is set
from flows.settings import SECTIONS  # noqa: E402

use_sections(SECTIONS)
