"""Fixtures for the orchestration tests: one Prefect test server for the session, and a prepared project
(data and teacher stages done) that flows run on."""
from __future__ import annotations

from pathlib import Path

import pytest
from pipeline_support import tiny_raw, working_directory, write_params


@pytest.fixture(scope="session")
def prefect_api():
    """One Prefect test server (temporary database) for the whole session; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory) -> Path:
    """A folder with the tiny params.yaml in which the data and teacher stages have run (read-only for tests:
    copy its outputs elsewhere before running stages that write)."""
    from dna.config import load_params
    from dna.pipeline import Run, stage_data, stage_teacher, validate

    root = tmp_path_factory.mktemp("project")
    write_params(root / "params.yaml", tiny_raw())
    with working_directory(root):
        params = load_params("params.yaml")
        validate(params)
        run = Run(params)
        stage_data(run)
        stage_teacher(run)
    return root
